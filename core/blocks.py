"""KV memory as identified blocks: reference counts and vLLM-style automatic prefix caching.

The pool owns `num_blocks` blocks of `block_size` token slots, ids 0..num_blocks-1. Every block
is in exactly one state: free (never used, or released with no known content), evictable
(reference count 0 but its content cached under a block hash) or referenced (held by one or
more block tables). A request owns a `BlockTable`: its KV block ids in token order, anonymous
extra blocks (a layered prefill's hidden states at the layer frontier) and its chained hashes
of full blocks, known ahead.

Block hash i chains hash i-1 with block i's content, so equal hashes mean equal prefixes.
When a block is full and computed through every layer, `mark_computed` registers hash -> block.
Admitting a request walks its hashes from the start while they are cached, stopping one token
short of the prompt's end (a full hit recomputes the last token to get its logits), and takes
references on those blocks; the rest grows with fresh blocks. Freeing drops references tail
first; a block reaching 0 with a hash becomes evictable (most recently used at the back, so a
request's tail is evicted before its head), any other goes back to the free list. Allocation
takes a free block first, else evicts the least recently used evictable block and forgets its
hash. Free + evictable is what can still be allocated (`num_free_blocks`). Block ids never
used yet are free implicitly (the next fresh id counts up), so a pool costs memory only for
the blocks it has handed out: a fleet of thousands of simulated replicas stays small.

How hashes are made from content (token ids, trace hash ids, a shared system prompt) is
core/hashes.py.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from core.hashes import (
    ROOT_HASH,
    BlockHash,
    shared_prefix_block_hashes,
    token_block_hashes,
    trace_block_hashes,
    unique_block_hashes,
)

__all__ = ["ROOT_HASH", "BlockHash", "BlockPool", "BlockTable", "NoFreeBlocksError",
           "PrefixCacheStats", "blocks_needed", "hidden_state_blocks", "peak_blocks",
           "shared_prefix_block_hashes", "token_block_hashes", "trace_block_hashes",
           "unique_block_hashes"]


# ---- block arithmetic ---------------------------------------------------------------------------
def blocks_needed(num_tokens: int, block_size: int, hidden_blocks_per_token: float = 0.0) -> int:
    """KV blocks for `num_tokens`, plus their hidden states where a prompt is part-way."""
    return -(-num_tokens // block_size) + hidden_state_blocks(num_tokens, hidden_blocks_per_token)


def hidden_state_blocks(num_tokens: int, hidden_blocks_per_token: float) -> int:
    """Anonymous blocks holding a part-way prompt's hidden states at the layer frontier."""
    return math.ceil(num_tokens * hidden_blocks_per_token)


def peak_blocks(num_prompt_tokens: int, max_tokens: int, block_size: int,
                hidden_blocks_per_token: float = 0.0) -> int:
    """The most blocks a request ever holds: hidden states part-way through the prompt, or the
    whole KV cache at its last token. Prefix hits do not lower it: shared blocks are held too."""
    return max(blocks_needed(num_prompt_tokens, block_size, hidden_blocks_per_token),
               blocks_needed(num_prompt_tokens + max_tokens, block_size))


# ---- the pool -----------------------------------------------------------------------------------
class NoFreeBlocksError(RuntimeError):
    """The pool cannot give a request the blocks asked for; nothing was changed."""


@dataclass(eq=False, slots=True)
class BlockTable:
    """One request's blocks. The request owns it; only the pool changes the block fields."""

    block_hashes: list[BlockHash] = field(default_factory=list)  # full blocks, token order
    num_prompt_tokens: int = 0  # prefix hits stop one token short of it; update on preemption
    block_ids: list[int] = field(default_factory=list)  # KV blocks, token order
    extra_block_ids: list[int] = field(default_factory=list)  # anonymous, never hashed
    num_tokens: int = 0  # token slots the KV blocks were allocated for
    num_hashed: int = 0  # leading block_ids already offered to the cache (or hits)
    num_cached_tokens: int = -1  # the prefix hit at admission; -1 while not admitted

    @property
    def is_admitted(self) -> bool:
        return self.num_cached_tokens >= 0

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids) + len(self.extra_block_ids)


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """Counted once per admission (a preempted request's recompute counts again), as vLLM does."""

    num_queries: int
    queried_tokens: int
    hit_tokens: int
    queried_blocks: int
    hit_blocks: int
    num_evictions: int

    @property
    def hit_rate(self) -> float:
        """vLLM's prefix cache hit rate: hit tokens / queried tokens."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockPool:
    """Blocks with reference counts, a free list and (with prefix caching) an LRU block cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 0 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 0 and block_size >= 1, got "
                             f"{num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # per block id below _num_fresh (ids from it up were never used: free, lowest first)
        self._refs: list[int] = []
        self._hash: list[BlockHash | None] = []
        self._num_fresh = 0
        self._free: list[int] = []  # released blocks with no content: a stack, taken first
        self.num_refs = 0  # references held by all tables together (a conservation check)
        self.ever_cached = False  # until a block is cached, no request can hit
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._cached: dict[BlockHash, int] = {}  # block hash -> the block holding that content
        self._stats = [0] * 6  # PrefixCacheStats fields, in order

    # ---- what callers read ----------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones and evictable cached ones."""
        return len(self._free) + self.num_blocks - self._num_fresh + len(self._evictable)

    @property
    def ref_counts(self) -> list[int]:
        """Reference count per block id (O(pool): for tests and debugging)."""
        refs = self._refs + [0] * (self.num_blocks - self._num_fresh)
        for b in self._free:  # a free block's stored count is stale (see _take_many)
            refs[b] = 0
        return refs

    @property
    def block_hash(self) -> list[BlockHash | None]:
        """The content hash each block is cached under, or None (O(pool))."""
        return self._hash + [None] * (self.num_blocks - self._num_fresh)


    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def free_block_ids(self) -> tuple[int, ...]:
        """Free blocks, next taken first (O(pool): for tests and debugging)."""
        return tuple(reversed(self._free)) + tuple(range(self._num_fresh, self.num_blocks))

    def evictable_block_ids(self) -> tuple[int, ...]:
        """Evictable blocks, least recently used (next evicted) first (O(pool))."""
        return tuple(self._evictable)

    def cached_block(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash)

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(*self._stats)

    def match_prefix(self, table: BlockTable) -> int:
        """Tokens of the table's prompt already in the cache (a peek: no references taken)."""
        if table.is_admitted:
            return table.num_cached_tokens
        return len(self._match(table)) * self.block_size

    # ---- what executors call --------------------------------------------------------------------
    def admit(self, table: BlockTable) -> int:
        """Take references on the table's cached prefix (once); return its cached tokens.

        An executor applying a plan admits all its new requests before growing any table, so
        that growth cannot evict a prefix the policy counted on (see `core.admission.Admission`)."""
        if not table.is_admitted:
            self._admit(table, self._match(table))
        return table.num_cached_tokens

    def allocate(self, table: BlockTable, num_tokens: int, num_extra_blocks: int = 0) -> None:
        """Admit if need be, grow the KV blocks to cover `num_tokens` and hold exactly
        `num_extra_blocks` anonymous blocks (surplus ones are released first). All or nothing:
        raises NoFreeBlocksError, changing nothing, when the pool cannot."""
        if table.num_cached_tokens >= 0 and num_extra_blocks == len(table.extra_block_ids):
            # admitted, extras unchanged (decode steps, full-stack chunks): KV growth only
            ids = table.block_ids
            num_new = -(-num_tokens // self.block_size) - len(ids)
            if num_new > 0:
                if num_new > len(self._free) + self.num_blocks - self._num_fresh + len(self._evictable):
                    raise NoFreeBlocksError(
                        f"{num_new} blocks needed to hold {num_tokens} tokens and "
                        f"{num_extra_blocks} extra blocks, {self.num_free_blocks} free of "
                        f"{self.num_blocks}")
                ids += self._take_many(num_new)
            if num_tokens > table.num_tokens:
                table.num_tokens = num_tokens
            return
        if table.is_admitted:
            hits: list[int] = []
            num_taken = 0
        else:
            hits = self._match(table)
            refs = self._refs
            num_taken = sum(1 for b in hits if refs[b] == 0)
        num_new = max(0, -(-num_tokens // self.block_size) - len(table.block_ids) - len(hits))
        extra_delta = num_extra_blocks - len(table.extra_block_ids)
        num_taken += num_new + max(0, extra_delta)
        if num_taken > self.num_free_blocks + max(0, -extra_delta):
            raise NoFreeBlocksError(
                f"{num_taken} blocks needed to hold {num_tokens} tokens and {num_extra_blocks} "
                f"extra blocks, {self.num_free_blocks} free of {self.num_blocks}")
        if not table.is_admitted:
            self._admit(table, hits)
        extra = table.extra_block_ids
        surplus = len(extra) - num_extra_blocks
        if surplus > 0:  # anonymous, held by this table alone: free, tail first, in one go
            self._free += reversed(extra[num_extra_blocks:])  # (counts left stale at 1)
            del extra[num_extra_blocks:]
            self.num_refs -= surplus
        if num_new:
            table.block_ids += self._take_many(num_new)
        if num_extra_blocks > len(extra):
            extra += self._take_many(num_extra_blocks - len(extra))
        table.num_tokens = max(table.num_tokens, num_tokens)

    def mark_computed(self, table: BlockTable, num_computed_tokens: int) -> None:
        """Tokens through every layer: cache the blocks that became full (others may hit them).
        Where another block already holds the same content, this one stays uncached."""
        end = min(num_computed_tokens // self.block_size, len(table.block_ids), len(table.block_hashes))
        if self.enable_prefix_caching:
            cached, hashes, ids = self._cached, table.block_hashes, table.block_ids
            for i in range(table.num_hashed, end):
                h = hashes[i]
                if h not in cached:
                    cached[h] = ids[i]
                    self._hash[ids[i]] = h
                    self.ever_cached = True
        table.num_hashed = max(table.num_hashed, end)

    def free(self, table: BlockTable) -> None:
        """Release the table's blocks, tail first (so its tail is evicted before its prefix), and
        reset it: a preempted request is admitted afresh and may hit its own blocks."""
        if table.num_hashed == 0 and table.num_cached_tokens <= 0:  # nothing shared or cached:
            free = self._free  # every block is held by this table alone, and becomes free
            free += reversed(table.extra_block_ids)  # (counts left stale: see _take_many)
            free += reversed(table.block_ids)
            self.num_refs -= len(table.extra_block_ids) + len(table.block_ids)
        else:
            self._release_all(table.extra_block_ids)
            self._release_all(table.block_ids)
        table.block_ids = []
        table.extra_block_ids = []
        table.num_tokens = table.num_hashed = 0
        table.num_cached_tokens = -1

    # ---- internals ------------------------------------------------------------------------------
    def _release_all(self, ids: list[int]) -> None:
        """_release of every block, tail first, inlined: a finished prompt frees hundreds."""
        refs, hashes, free, evictable = self._refs, self._hash, self._free, self._evictable
        self.num_refs -= len(ids)
        for b in reversed(ids):
            left = refs[b] - 1
            refs[b] = left
            if left == 0:
                if hashes[b] is None:
                    free.append(b)
                    refs[b] = 1  # stale on the free stack (see _take_many)
                else:
                    evictable[b] = None

    def _match(self, table: BlockTable) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        hashes = table.block_hashes
        limit = min(len(hashes), max(0, table.num_prompt_tokens - 1) // self.block_size)
        cached = self._cached
        hits: list[int] = []
        for i in range(limit):
            b = cached.get(hashes[i])
            if b is None:
                break
            hits.append(b)
        return hits

    def _admit(self, table: BlockTable, hits: list[int]) -> None:
        refs, evictable = self._refs, self._evictable
        for b in hits:
            if refs[b] == 0:  # a cached block nobody holds: it stops being evictable
                del evictable[b]
            refs[b] += 1
        self.num_refs += len(hits)
        table.block_ids.extend(hits)
        table.num_hashed = len(hits)
        table.num_cached_tokens = table.num_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            s = self._stats
            s[0] += 1
            s[1] += table.num_prompt_tokens
            s[2] += table.num_cached_tokens
            s[3] += -(-table.num_prompt_tokens // self.block_size)
            s[4] += len(hits)

    def _take_many(self, n: int) -> list[int]:
        """`n` blocks, as n calls of _take would give them (free stack, fresh ids, evictions).

        A block on the free stack keeps a stale reference count of 1 (free and _release leave
        it so; nothing reads it there): taking one needs no per-block work."""
        free = self._free
        if 0 < n <= len(free):  # the usual case once the pool has been through its ids once
            taken = free[:-n - 1:-1]  # the stack's top n, in the order pop gives them
            del free[-n:]
            self.num_refs += n
            return taken
        if n == 1:  # a decode's next block, a fresh id
            b = self._num_fresh
            if b < self.num_blocks:
                self._num_fresh = b + 1
                self._refs.append(1)
                self._hash.append(None)
                self.num_refs += 1
                return [b]
        k = min(n, len(free))
        taken = free[:-k - 1:-1] if k else []  # the stack's top k, in the order pop gives them
        if k:
            del free[-k:]
            self.num_refs += k
        m = min(n - k, self.num_blocks - self._num_fresh)
        if m > 0:
            first = self._num_fresh
            taken += range(first, first + m)
            self._refs += [1] * m
            self._hash += [None] * m
            self._num_fresh = first + m
            self.num_refs += m
            k += m
        if k < n:
            taken += [self._take() for _ in range(n - k)]  # evictions
        return taken

    def _take(self) -> int:
        self.num_refs += 1
        if self._free:
            b = self._free.pop()
        elif self._num_fresh < self.num_blocks:
            b = self._num_fresh
            self._num_fresh += 1
            self._refs.append(1)
            self._hash.append(None)
            return b
        else:
            b = self._evictable.popitem(last=False)[0]
            del self._cached[self._hash[b]]  # type: ignore[arg-type]  # evictable: hashed
            self._hash[b] = None
            self._stats[5] += 1
        self._refs[b] = 1
        return b

    def _release(self, block_id: int) -> None:
        self.num_refs -= 1
        left = self._refs[block_id] - 1
        self._refs[block_id] = left
        if left == 0:
            if self._hash[block_id] is None:
                self._free.append(block_id)
                self._refs[block_id] = 1  # stale on the free stack (see _take_many)
            else:
                self._evictable[block_id] = None
