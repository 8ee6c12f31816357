"""The engine's KV pages are the replica's pool blocks, and prefix-cached blocks are really reused:
a request sharing a long prefix with one served before it computes only its own tail, attending
to the K/V the first request wrote, and its logits and tokens are those of a full recompute."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import engine.serve as serve_module  # noqa: E402
from core.blocks import BlockTable  # noqa: E402
from core.state import ReplicaState  # noqa: E402
from costmodel import CostModel, Tile, default_profile, load_gpu, load_model  # noqa: E402
from engine.executor import Engine  # noqa: E402
from engine.serve import serve  # noqa: E402
from policies.base import decode_tiles, prompt_tile  # noqa: E402
from traces import Request  # noqa: E402

ATOL = 1e-4  # fp32: a chunk over cached context and a whole prompt sum in different orders
BS = 16  # the pool's block size = the engine's page size (SDPA takes any)
SHARED = 6 * BS + 5  # six full shared blocks, then a part block
PROMPTS = {0: 40, 1: 57}  # each request's own tail after the shared prefix
# served between them, sharing nothing: it takes the pages a cache that forgot the first
# request's blocks would hand out again, so reading them gives its K/V, not the first's
OTHER, OTHER_LEN = 9, 120
OUT = 4


@pytest.fixture(scope="module")
def spec():
    return load_model("tiny-moe")


@pytest.fixture(scope="module")
def weights(spec):
    return Engine(spec, "cpu", seed=0, kv_tokens=BS).w


@pytest.fixture(scope="module")
def cm(spec):
    return CostModel(spec, "cpu", default_profile(load_gpu("cpu")))


class _OneAtATime:
    """Serves requests one after the other (the next is admitted once the last has finished),
    prompts in 64-token chunks: the second request starts when the first's blocks are cached,
    whatever the wall clock."""

    name = "one-at-a-time"
    stall_free = True
    steady_decode = False

    def schedule(self, state: ReplicaState) -> tuple[Tile, ...]:
        L = state.num_layers
        if state.decodes:
            return tuple(decode_tiles(state))
        req = state.running[0] if state.running else state.waiting[0] if state.waiting else None
        if req is None:
            return ()
        t1 = min(req.num_prompt_tokens, req.num_computed_tokens + 64)
        return (prompt_tile(req, t1, 0, L, L),) if state.admission().try_admit(req, t1) else ()


def _prompts(vocab: int) -> dict[int, list[int]]:
    gen = torch.Generator().manual_seed(11)
    shared = torch.randint(0, vocab, (SHARED,), generator=gen).tolist()
    prompts = {rid: shared + torch.randint(0, vocab, (n,), generator=gen).tolist()
               for rid, n in PROMPTS.items()}
    prompts[OTHER] = torch.randint(0, vocab, (OTHER_LEN,), generator=gen).tolist()
    return prompts


def prompts_of_all() -> tuple[int, ...]:
    return (*PROMPTS, OTHER)


def _serve(spec, weights, cm, caching: bool):  # type: ignore[no-untyped-def]
    """Request 1 starts after request 0 has finished; a fresh engine on the same weights."""
    eng = Engine(spec, "cpu", seed=0, kv_tokens=4096, weights=weights)
    prompts = _prompts(spec.vocab)
    order = (0, OTHER, 1)  # served in this order
    reqs = [Request(rid, 0.001 * i, len(prompts[rid]), OUT) for i, rid in enumerate(order)]
    tokens: list[tuple[int, int, int, float]] = []
    logits: dict[int, list[torch.Tensor]] = {}
    res = serve(eng, reqs, _OneAtATime(), cm, block_size=BS, enable_prefix_caching=caching,
                prompt_token_ids=prompts, token_log=tokens, return_logits=logits)
    rq = res.requests.set_index("req_id")
    assert res.metrics["completed"] == 3
    assert rq.loc[0, "finish_s"] < rq.loc[OTHER, "first_token_s"]  # one after the other
    assert rq.loc[OTHER, "finish_s"] < rq.loc[1, "first_token_s"]
    assert not eng.tokens and not eng.kv.pages  # released; the pool owned the pages
    assert eng.kv.page_size == BS
    by_req = {rid: [tok for r, _, tok, _ in tokens if r == rid] for rid in prompts_of_all()}
    return res, by_req, logits, eng.embedded


def test_cached_prefix_is_reused_and_logits_are_unchanged(spec, weights, cm):
    off, tok_off, log_off, emb_off = _serve(spec, weights, cm, caching=False)
    on, tok_on, log_on, emb_on = _serve(spec, weights, cm, caching=True)
    hit = (SHARED // BS) * BS
    assert on.metrics["prefix_cache_hits"] == hit and off.metrics["prefix_cache_hits"] == 0
    # the engine computed the second prompt from the first uncached token only
    assert emb_off[1] == SHARED + PROMPTS[1] + OUT - 1
    assert emb_on[1] == emb_off[1] - hit
    assert emb_on[0] == emb_off[0] and emb_on[OTHER] == emb_off[OTHER]
    assert tok_on == tok_off and all(len(t) == OUT for t in tok_on.values())
    for rid in prompts_of_all():
        assert len(log_on[rid]) == len(log_off[rid]) == OUT
        for a, b in zip(log_on[rid], log_off[rid], strict=True):
            assert float((a - b).abs().max()) < ATOL


def test_the_comparison_catches_a_page_table_pointing_at_the_wrong_blocks(spec, weights, cm,
                                                                        monkeypatch):
    """The mutation the test above must catch: the second request's first cached block replaced
    by another block (its own last one) gives other logits, so equal logits mean the earlier
    request's K/V was read. (Swapping two cached blocks would not do: every query sees all of
    them, and attention over a set of keys, positions already rotated in, ignores their order.)"""
    _, _, log_off, _ = _serve(spec, weights, cm, caching=False)
    real = serve_module.reserve

    def scrambled(state, plan):  # type: ignore[no-untyped-def]
        tables = real(state, plan)
        out = {}
        for rid, t in tables.items():
            ids = list(t.block_ids)
            if t.num_cached_tokens > 0:  # the first cached block -> the request's last block
                ids[0] = ids[-1]
            out[rid] = BlockTable(block_ids=ids)
        return out

    monkeypatch.setattr(serve_module, "reserve", scrambled)
    _, _, log_bad, emb = _serve(spec, weights, cm, caching=True)
    assert emb[1] == SHARED + PROMPTS[1] + OUT - 1 - (SHARED // BS) * BS  # it did hit
    assert float((log_bad[1][0] - log_off[1][0]).abs().max()) > 100 * ATOL



def test_reserve_takes_what_commit_would_and_commit_takes_nothing_twice():
    """core.step.reserve before each plan, then commit, holds exactly the blocks commit alone
    holds (a replica served without reserve, side by side), prefix hits included; commit
    after reserve takes no block."""
    from core.blocks import token_block_hashes
    from core.request import RequestState
    from core.step import commit, prepare, reserve

    ids = list(range(1000, 1150))
    states = [ReplicaState(num_layers=4, num_total_blocks=64, block_size=BS) for _ in range(2)]
    for state in states:
        for rid in (0, 1):
            state.waiting.append(RequestState(rid, 0.0, 150, 2, token_block_hashes(ids, BS)))
    policy, now = _OneAtATime(), 0.0
    reserved, plain = states
    while reserved.running or reserved.waiting:
        step = prepare(reserved, policy, now, checked=True, on_preempt=lambda r: None)
        assert prepare(plain, policy, now, checked=True, on_preempt=lambda r: None) == step
        tables = reserve(reserved, step.plan)
        for t in step.plan:  # every tile's tokens have their blocks before it runs
            assert len(tables[t.req_id].block_ids) * BS >= t.t1
        held = {rid: list(t.block_ids) for rid, t in tables.items()}
        refs = reserved.pool.num_refs
        commit(reserved, step.plan, now)
        commit(plain, step.plan, now)
        assert reserved.pool.num_refs <= refs  # commit took nothing (finishing frees)
        for a, b in zip(reserved.running, plain.running, strict=True):
            assert a.block_table.block_ids == b.block_table.block_ids == held[a.req_id]
        assert reserved.memory_error() is None
        now += 1.0
    assert reserved.pool.stats() == plain.pool.stats()
    assert reserved.pool.stats().hit_tokens == (150 - 1) // BS * BS


def test_the_policy_sees_the_engines_own_kv_memory(spec, weights, cm):
    """An engine with KV for 32 blocks of 16 tokens: the replica's pool is those 32 blocks (not
    the cost model's far larger budget), so requests that do not fit together are preempted."""
    eng = Engine(spec, "cpu", seed=0, kv_tokens=512, weights=weights)
    reqs = [Request(i, 0.0, 200, 90) for i in range(3)]  # 19 blocks each at full length
    res = serve(eng, reqs, "chunked:256", cm, block_size=BS)
    assert eng.kv.num_pages == 512 // BS
    assert res.metrics["completed"] == 3 and res.metrics["preemptions"] > 0
    assert not eng.tokens
