"""core.blocks: the KV block pool, prefix caching, block hashes; and core.admission's Admission.

Hand-worked cases (block ids and orders worked out on paper), then a property test running random
allocate/grow/compute/free/match/admission sequences against a small model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from itertools import count, takewhile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.admission import Admission
from core.blocks import (
    BlockPool,
    BlockTable,
    NoFreeBlocksError,
    blocks_needed,
    hidden_state_blocks,
    peak_blocks,
    shared_prefix_block_hashes,
    token_block_hashes,
    trace_block_hashes,
    unique_block_hashes,
)


def table_for(tokens: list[int], block_size: int) -> BlockTable:
    return BlockTable(token_block_hashes(tokens, block_size), len(tokens))


def compute(pool: BlockPool, table: BlockTable, num_tokens: int, then_free: bool = True) -> None:
    """Run a prompt: its blocks, its tokens computed and cached, then (usually) finished."""
    pool.allocate(table, num_tokens)
    pool.mark_computed(table, num_tokens)
    if then_free:
        pool.free(table)


def snapshot(pool: BlockPool, *tables: BlockTable) -> tuple[object, ...]:
    return (pool.free_block_ids(), pool.evictable_block_ids(), tuple(pool.ref_counts),
            tuple(pool.block_hash), pool.stats(),
            tuple((tuple(t.block_ids), tuple(t.extra_block_ids), t.num_tokens, t.num_hashed,
                   t.num_cached_tokens) for t in tables))


# ---- hand-worked cases --------------------------------------------------------------------------
def test_share_free_evict_worked_example():
    pool = BlockPool(8, 4)
    a = table_for(list(range(10)), 4)  # 2 full blocks
    assert len(a.block_hashes) == 2 and pool.match_prefix(a) == 0
    pool.allocate(a, 10)
    assert a.block_ids == [0, 1, 2] and pool.num_free_blocks == 5
    pool.mark_computed(a, 10)
    assert [pool.cached_block(h) for h in a.block_hashes] == [0, 1]
    b = table_for(list(range(8)) + [100, 101, 102, 103], 4)
    assert b.block_hashes[:2] == a.block_hashes and b.block_hashes[2] != a.block_hashes[1]
    assert pool.match_prefix(b) == 8
    pool.allocate(b, 12)
    assert b.block_ids == [0, 1, 3] and b.num_cached_tokens == 8
    assert pool.ref_counts[:4] == [2, 2, 1, 1] and pool.num_free_blocks == 4
    pool.free(a)  # block 2 had no hash: back to the free list; 0 and 1 are still held by b
    assert pool.ref_counts[:4] == [1, 1, 0, 1] and pool.evictable_block_ids() == ()
    pool.free(b)  # tail first: 3 (no hash) free, then 1, then 0 become evictable
    assert pool.evictable_block_ids() == (1, 0)
    assert pool.free_block_ids() == (3, 2, 4, 5, 6, 7) and pool.num_free_blocks == 8
    assert b.block_ids == [] and not b.is_admitted
    c = BlockTable()
    pool.allocate(c, 28)  # 7 blocks: the six free ones, then evicts the LRU block 1
    assert c.block_ids == [3, 2, 4, 5, 6, 7, 1]
    assert pool.cached_block(a.block_hashes[1]) is None and pool.block_hash[1] is None
    assert pool.cached_block(a.block_hashes[0]) == 0 and pool.evictable_block_ids() == (0,)
    assert pool.match_prefix(a) == 4  # the chain breaks at the evicted block
    s = pool.stats()
    assert (s.num_queries, s.queried_tokens, s.hit_tokens, s.queried_blocks, s.hit_blocks,
            s.num_evictions) == (3, 22, 8, 6, 2, 1)
    assert s.hit_rate == pytest.approx(8 / 22)


def test_a_full_prompt_hit_recomputes_the_last_token():
    pool = BlockPool(8, 4)
    compute(pool, table_for(list(range(8)), 4), 8)
    assert pool.match_prefix(table_for(list(range(8)), 4)) == 4  # 8 cached, one token left
    assert pool.match_prefix(table_for(list(range(9)), 4)) == 8
    assert pool.match_prefix(table_for(list(range(1)), 4)) == 0


def test_only_full_computed_blocks_are_cached_once():
    pool = BlockPool(8, 4)
    a, b = table_for(list(range(9)), 4), table_for(list(range(9)), 4)
    pool.allocate(a, 9)
    pool.allocate(b, 9)  # neither computed yet: no hit
    pool.mark_computed(a, 7)  # block 1 only partly computed
    assert [pool.cached_block(h) for h in a.block_hashes] == [0, None]
    pool.mark_computed(a, 9)
    pool.mark_computed(b, 9)  # the same content: block 0 and 1 keep it
    assert [pool.cached_block(h) for h in a.block_hashes] == [0, 1]
    assert b.block_ids == [3, 4, 5] and pool.block_hash[3] is None and pool.block_hash[4] is None
    pool.free(b)
    assert pool.evictable_block_ids() == () and pool.num_free_blocks == 5


def test_failed_allocation_changes_nothing():
    pool = BlockPool(4, 4)
    compute(pool, table_for(list(range(8)), 4), 8)  # blocks 0, 1 evictable
    b = table_for(list(range(8)) + [9] * 12, 4)
    before = snapshot(pool, b)
    with pytest.raises(NoFreeBlocksError, match="6 blocks needed"):
        pool.allocate(b, 24)  # 2 evictable hits + 4 fresh > 4
    assert snapshot(pool, b) == before
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(BlockTable(), 4, num_extra_blocks=4)
    assert snapshot(pool, b) == before


def test_extra_blocks_grow_shrink_and_offset_growth():
    pool = BlockPool(5, 4)
    t = BlockTable(num_prompt_tokens=12)
    pool.allocate(t, 8, num_extra_blocks=3)
    assert t.block_ids == [0, 1] and t.extra_block_ids == [2, 3, 4] and pool.num_free_blocks == 0
    assert Admission(pool).cost(t, 12) == 0  # one more KV block, three extras given back: net -2, floored
    pool.allocate(t, 12, num_extra_blocks=0)  # extras go first, so the growth fits
    assert t.block_ids == [0, 1, 2] and t.extra_block_ids == [] and pool.num_free_blocks == 2


def test_prefix_caching_off():
    pool = BlockPool(8, 4, enable_prefix_caching=False)
    compute(pool, table_for(list(range(12)), 4), 12)
    assert pool.evictable_block_ids() == () and pool.match_prefix(table_for(list(range(12)), 4)) == 0
    assert pool.stats().num_queries == 0 and pool.num_free_blocks == 8


def test_admission_prices_shared_evictable_and_fresh_blocks():
    bs, pool = 4, BlockPool(14, 4)
    shared = shared_prefix_block_hashes(12, bs, 7, 8, request_key=1)
    running = BlockTable(shared, 12)
    compute(pool, running, 12, then_free=False)  # blocks 0, 1 hold system prompt 7; block 2 the request's
    old = BlockTable(shared_prefix_block_hashes(9, bs, 8, 8, request_key=2), 9)
    compute(pool, old, 9)  # system prompt 8: blocks 3, 4 evictable
    decode = BlockTable([], 8)
    pool.allocate(decode, 8)  # full: its next token needs a block
    assert pool.num_free_blocks == 14 - 3 - 2  # blocks 3, 4 evictable count as free
    adm = Admission(pool, [running, decode], hidden_blocks_per_token=0.25)
    assert adm.num_reserved_blocks == 2 and adm.num_free_blocks == 7  # both decodes' blocks are full
    w1 = BlockTable(shared_prefix_block_hashes(12, bs, 7, 8, request_key=3), 12)
    w2 = BlockTable(shared_prefix_block_hashes(12, bs, 8, 8, request_key=4), 12)
    w3 = BlockTable(shared_prefix_block_hashes(12, bs, 8, 8, request_key=5), 12)
    w4 = BlockTable(unique_block_hashes(6, 0, 2), 8)
    assert adm.num_cached_tokens(w1) == adm.num_cached_tokens(w2) == 8
    assert adm.cost(w1, 12) == 1  # prefix resident in `running`: only the third block
    assert adm.cost(w2, 12) == 3  # two evictable hits stop being free, plus one fresh
    adm.reserve(w1, 12)
    adm.reserve(w2, 12)
    assert adm.cost(w3, 12) == 1  # w2 already claimed the evictable prefix
    adm.reserve(w3, 12)
    assert adm.cost(w4, 8, partial=True) == 2 + 2  # KV plus ceil(8 * 0.25) hidden-state blocks
    assert adm.num_free_blocks == 2 and adm.can_admit(w4, 8) and not adm.can_admit(w4, 16)
    assert not adm.try_admit(w4, 16) and adm.num_free_blocks == 2
    with pytest.raises(NoFreeBlocksError, match="4 blocks needed"):
        adm.reserve(w4, 8, partial=True)
    # The executor: admit the plan's new tables, then grow in plan order; it all fits exactly.
    for w in (w1, w2, w3):
        pool.admit(w)
    pool.allocate(decode, 9)
    pool.allocate(running, 13)
    for w in (w1, w2, w3):
        pool.allocate(w, 12)
    assert pool.num_free_blocks == 2
    assert w2.block_ids[:2] == w3.block_ids[:2] == [3, 4] and w1.block_ids[:2] == [0, 1]


def test_block_arithmetic():
    assert blocks_needed(100, 16) == 7 and blocks_needed(100, 16, 0.1) == 17
    assert hidden_state_blocks(8, 0.25) == 2 and hidden_state_blocks(9, 0.25) == 3
    assert peak_blocks(100, 20, 16, 0.1) == 17 and peak_blocks(100, 20, 16) == 8  # hidden; ceil(120/16)
    assert peak_blocks(0, 1, 16) == 1


# ---- block hashes -------------------------------------------------------------------------------
def test_token_hashes_chain():
    a = token_block_hashes(list(range(20)), 4)
    b = token_block_hashes(list(range(5)) + [99] + list(range(6, 20)), 4)
    assert len(a) == 5 and a[0] == b[0] and all(x != y for x, y in zip(a[1:], b[1:], strict=True))
    assert token_block_hashes(list(range(8, 20)), 4, parent=a[1]) == a[2:]  # extend from a boundary
    assert token_block_hashes(list(range(3)), 4) == []


def test_trace_hashes_share_up_to_the_covering_trace_block():
    a = trace_block_hashes([1, 2, 3], 512, 1536, 16)
    b = trace_block_hashes([1, 2, 4], 512, 1536, 16)
    assert len(a) == 96 and a[:64] == b[:64] and all(x != y for x, y in zip(a[64:], b[64:], strict=True))
    assert len(trace_block_hashes([1], 512, 1000, 16)) == 32  # no ids past token 512
    big_a, big_b = trace_block_hashes([1, 2], 512, 1024, 1024), trace_block_hashes([1, 3], 512, 1024, 1024)
    assert len(big_a) == 1 and big_a != big_b  # pool block 0 covers both trace blocks
    odd_a, odd_b = trace_block_hashes([1, 2], 512, 1024, 384), trace_block_hashes([1, 3], 512, 1024, 384)
    assert odd_a[0] == odd_b[0] and odd_a[1] != odd_b[1]  # block 1 (tokens 384..767) straddles


def test_shared_prefix_hashes():
    a = shared_prefix_block_hashes(150, 16, 3, 100, request_key=1)
    b = shared_prefix_block_hashes(130, 16, 3, 100, request_key=2)
    c = shared_prefix_block_hashes(150, 16, 4, 100, request_key=1)
    assert len(set(a)) == len(a) == 9 and len(b) == 8
    assert a[:6] == b[:6] and a[6] != b[6]  # 96 tokens wholly inside the 100-token system prompt
    assert not set(a[:6]) & set(c) and a[6:] == c[6:] == unique_block_hashes(1, 6, 9)


def test_hashes_are_the_same_in_every_process():
    expr = ("[token_block_hashes(list(range(40)), 16), trace_block_hashes([5, 9], 512, 1024, 256), "
            "shared_prefix_block_hashes(64, 16, 1, 40, 7)]")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", f"from core.blocks import *; print({expr})"],
                             capture_output=True, text=True, check=True, cwd=root,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        assert out == repr(eval(expr))


# ---- the property test --------------------------------------------------------------------------
class Model:
    """What the pool must agree with: live tables, the cache's content and release order."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.tables: list[BlockTable] = []
        self.cached: dict[int, int] = {}  # block hash -> block
        self.released_at: dict[int, int] = {}  # block -> when its last reference went
        self.clock = count()

    def expected_hits(self, t: BlockTable) -> list[int]:
        if not self.pool.enable_prefix_caching:
            return []
        limit = min(len(t.block_hashes), max(0, t.num_prompt_tokens - 1) // self.pool.block_size)
        return [self.cached[h] for h in takewhile(self.cached.__contains__, t.block_hashes[:limit])]

    def allocate(self, t: BlockTable, num_tokens: int, num_extra: int) -> bool:
        pool = self.pool
        admitted, before = t.is_admitted, snapshot(pool, *self.tables)
        hits = [] if admitted else self.expected_hits(t)
        kv_held, extra_held = max(len(t.block_ids), len(hits)), len(t.extra_block_ids)
        num_free = len(pool.free_block_ids()) + max(0, len(t.extra_block_ids) - num_extra)
        lru = [b for b in pool.evictable_block_ids() if b not in hits]
        evictions = pool.stats().num_evictions
        try:
            pool.allocate(t, num_tokens, num_extra)
        except NoFreeBlocksError:
            assert snapshot(pool, *self.tables) == before
            return False
        assert t.block_ids[:len(hits)] == hits or admitted
        # the blocks this call took: KV past what was held (or hit), extras past those kept; a
        # surplus extra released first is free again and may be among them
        fresh = t.block_ids[kv_held:] + t.extra_block_ids[extra_held:]
        evicted = lru[:max(0, len(fresh) - num_free)]  # free blocks first, then LRU order
        assert set(evicted) <= set(fresh) and pool.stats().num_evictions == evictions + len(evicted)
        self.cached = {h: b for h, b in self.cached.items() if b not in evicted}
        return True

    def mark_computed(self, t: BlockTable) -> None:
        end = min(t.num_tokens // self.pool.block_size, len(t.block_ids), len(t.block_hashes))
        if self.pool.enable_prefix_caching:
            for i in range(t.num_hashed, end):
                self.cached.setdefault(t.block_hashes[i], t.block_ids[i])
        self.pool.mark_computed(t, t.num_tokens)

    def free(self, t: BlockTable) -> None:
        others = Counter(b for u in self.tables if u is not t for b in u.block_ids)
        for b in reversed(t.block_ids):
            if others[b] == 0 and self.pool.block_hash[b] is not None:
                self.released_at[b] = next(self.clock)
        self.pool.free(t)

    def check(self) -> None:
        pool, n = self.pool, self.pool.num_blocks
        holders: Counter[int] = Counter()
        for t in self.tables:
            ids = t.block_ids + t.extra_block_ids
            assert len(set(ids)) == len(ids)
            holders.update(ids)
            assert len(t.block_ids) == -(-t.num_tokens // pool.block_size)
            for i, b in enumerate(t.block_ids[:t.num_hashed]):
                assert pool.block_hash[b] in (None, t.block_hashes[i])
            assert all(pool.block_hash[b] is None for b in t.extra_block_ids)
        assert pool.ref_counts == [holders[b] for b in range(n)]
        free, lru = pool.free_block_ids(), pool.evictable_block_ids()
        used = tuple(b for b in range(n) if pool.ref_counts[b] > 0)  # free + evictable + used = all
        assert len(free) == len(set(free)) and sorted(free + lru + used) == list(range(n))
        assert pool.num_free_blocks == len(free) + len(lru)
        hashes = pool.block_hash
        assert all(hashes[b] is None for b in free) and all(hashes[b] is not None for b in lru)
        hashed = {h: b for b, h in enumerate(pool.block_hash) if h is not None}  # one block per hash
        assert hashed == self.cached and len(hashed) == n - pool.block_hash.count(None)
        assert all(pool.cached_block(h) == b for h, b in hashed.items())
        assert list(lru) == sorted(lru, key=self.released_at.__getitem__)


def admission_round(m: Model, pick: int, x: int, hidden: float) -> None:
    """Reserve through Admission, then execute as an executor would: it must all fit."""
    pool = m.pool
    decodes = [t for i, t in enumerate(m.tables) if t.is_admitted and (pick >> (i % 4)) & 1]
    adm = Admission(pool, decodes, hidden)
    accepted, shrinks = [], False
    if adm.num_free_blocks < 0:  # the decodes' growth does not fit: the scheduler preempts first
        assert not any(adm.can_admit(t, t.num_tokens) for t in m.tables)
        return
    for i, t in enumerate(m.tables):
        if t in decodes or not (x >> (i % 8)) & 1:
            continue
        partial = bool(t.extra_block_ids) or (x + i) % 3 == 0
        tokens = max(t.num_tokens, adm.num_cached_tokens(t)) + (x + i) % 9
        if adm.try_admit(t, tokens, partial):
            accepted.append((t, tokens, hidden_state_blocks(tokens, hidden) if partial else 0))
            shrinks |= accepted[-1][2] < len(t.extra_block_ids)
    left = adm.num_free_blocks
    for t, _, _ in accepted:
        pool.admit(t)
    for t in decodes:
        assert m.allocate(t, t.num_tokens + 1, len(t.extra_block_ids))
    for t, tokens, extra in accepted:
        assert m.allocate(t, tokens, extra)
    assert pool.num_free_blocks >= left
    assert shrinks or pool.num_free_blocks == left  # priced exactly


# (operation, which table, a small number that sizes it)
OPS = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 15), st.integers(0, 255)),
               min_size=30, max_size=80)


@settings(derandomize=True, database=None, deadline=None, max_examples=200)
@given(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4]),
       caching=st.booleans(), ops=OPS)
def test_random_sequences_keep_the_invariants(num_blocks, block_size, caching, ops):
    m = Model(BlockPool(num_blocks, block_size, caching))
    hidden = 0.5
    for key, (op, pick, x) in enumerate(ops):
        live = m.tables
        t = live[pick % len(live)] if live else None
        if op == 0 or t is None:  # a request: one of 3 system prompts (2, 4, 6 blocks), a question
            system_prompt_len = 2 * (x % 3 + 1) * block_size
            n = max(1, system_prompt_len - 2 + (x >> 2) % 9)
            live.append(BlockTable(shared_prefix_block_hashes(n, block_size, x % 3, system_prompt_len,
                                                              key), n))
        elif op == 1:  # grow, maybe holding hidden states
            tokens = max(t.num_tokens, m.pool.match_prefix(t)) + x % 12
            m.allocate(t, tokens, hidden_state_blocks(tokens, hidden) if x & 16 else 0)
        elif op == 2 and t.is_admitted:
            m.mark_computed(t)
        elif op == 3:  # finish, or be preempted and wait with its hashes kept
            m.free(t)
            if x & 1:
                live.remove(t)
        elif op == 4:
            assert m.pool.match_prefix(t) == (t.num_cached_tokens if t.is_admitted
                                              else len(m.expected_hits(t)) * block_size)
        elif op == 5:
            admission_round(m, pick, x, hidden)
        m.check()
    for t in list(m.tables):
        m.free(t)
        m.tables.remove(t)
        m.check()
    assert m.pool.num_free_blocks == num_blocks


# ---- speed --------------------------------------------------------------------------------------
def benchmark(num_requests: int = 4000) -> None:
    """Calls/s: 2048-token prompts (1024 shared, 8 system prompts), 16-token blocks, 256 running."""
    import time

    bs, pool, clock = 16, BlockPool(40_000, 16), time.perf_counter
    spent = dict.fromkeys(("Admission", "admit", "decode", "free"), 0.0)
    running: list[BlockTable] = []
    for k in range(num_requests):
        t = BlockTable(shared_prefix_block_hashes(2048, bs, k % 8, 1024, k), 2048)
        t_start = clock()
        admission = Admission(pool, running)  # once per schedule call: scans the decodes
        t0 = clock()
        assert admission.try_admit(t, 2048)
        compute(pool, t, 2048, then_free=False)
        t1 = clock()
        for n in range(2049, 2049 + 64):
            pool.allocate(t, n)
        t2 = clock()
        running.append(t)
        if len(running) > 256:
            pool.free(running.pop(0))
        for name, seconds in zip(spent, (t0 - t_start, t1 - t0, (t2 - t1) / 64, clock() - t2), strict=True):
            spent[name] += seconds
    for name, seconds in spent.items():
        print(f"{name:>9}: {num_requests / seconds:>12,.0f} calls/s")
    print(f"hit rate {pool.stats().hit_rate:.3f}, evictions {pool.stats().num_evictions}")


if __name__ == "__main__":
    benchmark()
