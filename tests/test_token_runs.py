"""A request's token gaps, however they were emitted (one step at a time, a fast-forwarded
stretch, before and after a preemption), are bit for bit the differences of its token times;
the per-request P99/max and the pooled ITL percentiles and histogram computed from them equal
numpy's on the plain list of gaps."""

from __future__ import annotations

from array import array

import numpy as np
import pytest

from core.records import _HIST_EDGES, Recorder, _p99_and_max
from core.request import RequestState
from core.state import ReplicaState
from core.step import commit
from core.stretch import apply_stretch
from costmodel import Tile
from policies.base import decode_tiles

# irregular iteration ends (no affine run): each a sum of uneven latencies, as SimPy adds them
_LATENCIES_S = (0.0131, 0.0127, 0.02203, 0.0099, 0.0145, 0.0131, 0.0301, 0.0112, 0.0177)


def _prefilled(outputs: list[int]) -> ReplicaState:
    """Requests whose prompts (one tile each) finished at t = 1.0, each with its first token."""
    state = ReplicaState(num_layers=4, num_total_blocks=1000, block_size=16)
    state.waiting = [RequestState(i, 0.0, 40 + 13 * i, o) for i, o in enumerate(outputs)]
    commit(state, tuple(Tile(r.req_id, 0, r.num_prompt_tokens, 0, 4, 0, True)
                        for r in state.waiting), 1.0)
    return state


def _ends(start_s: float, n: int, offset: int) -> list[float]:
    ends, t = [], start_s
    for j in range(n):
        t += _LATENCIES_S[(j + offset) % len(_LATENCIES_S)]
        ends.append(t)
    return ends


def _run(fast: bool, outputs: list[int], preempt: bool) -> dict[int, RequestState]:
    """Five single decode steps, then nine steps (one stretch when `fast`), then (with
    `preempt`) the newest request recomputed and decoded again: every request as it ended."""
    state = _prefilled(outputs)
    everyone = {r.req_id: r for r in state.running}
    now = 1.0
    for end_s in _ends(now, 5, 0):
        commit(state, tuple(decode_tiles(state)), end_s)
        now = end_s
    ends = _ends(now, 9, 5)
    if fast:
        apply_stretch(state, list(state.running), [()] * len(ends), ends)
    else:
        for end_s in ends:
            commit(state, tuple(decode_tiles(state)), end_s)
    now = ends[-1]
    if preempt:
        victim = state.preempt_newest()
        now += 0.05  # its recompute: the whole prompt (output so far included) again
        commit(state, (Tile(victim.req_id, 0, victim.num_prompt_tokens, 0, 4, 0, True),
                       *decode_tiles(state)), now)
        for end_s in _ends(now, 4, 2):
            commit(state, tuple(decode_tiles(state)), end_s)
    return everyone


@pytest.mark.parametrize("preempt", [False, True])
def test_stretch_gaps_are_the_step_by_step_gaps_bit_for_bit(preempt: bool) -> None:
    outputs = [40, 40, 15]  # request 2 finishes at the stretch's last step
    fast, slow = _run(True, outputs, preempt), _run(False, outputs, preempt)
    for rid, a in fast.items():
        b = slow[rid]
        assert a.itl_s.tobytes() == b.itl_s.tobytes()
        assert (a.num_output_tokens, a.finish_s, a.last_token_s) == (
            b.num_output_tokens, b.finish_s, b.last_token_s)
        # one gap before each token after the first; preemption keeps them (and folds the
        # tokens so far into max_tokens' reduction)
        emitted = a.output_len - a.max_tokens + a.num_output_tokens
        assert len(a.itl_s) == emitted - 1
    if preempt:
        assert fast[1].num_preemptions == 1 and len(fast[1].itl_s) == 5 + 9 + 1 + 4


@pytest.mark.parametrize("streamed", [False, True])
def test_records_equal_numpy_on_the_plain_gaps(streamed: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    reqs = _run(True, [40, 40, 15], preempt=True)
    rec = Recorder(num_layers=4, stream_dir=tmp_path if streamed else None)
    kept = {}  # each request's gaps (the recorder takes them)
    for rid, r in reqs.items():
        kept[rid] = np.frombuffer(r.itl_s).copy()
        assert len(kept[rid]) > 10
        rec.finished(r, 0)
    rows = rec.requests_frame()
    pooled = np.concatenate([kept[rid] for rid in rows["req_id"]])
    for rid, p99_ms, max_ms in zip(rows["req_id"], rows["p99_itl_ms"], rows["max_itl_ms"],
                                   strict=True):
        gaps = kept[rid]
        assert p99_ms == pytest.approx(np.percentile(gaps, 99) * 1e3, rel=1e-12)
        assert max_ms == gaps.max() * 1e3
    if streamed:  # the histogram holds every gap, each in searchsorted's bin
        want = np.bincount(np.searchsorted(_HIST_EDGES, pooled), minlength=len(_HIST_EDGES) + 1)
        rec._bin_gaps()
        assert rec.itl_hist is not None and (rec.itl_hist == want).all()
    else:
        assert rec.itl_percentiles_ms((50, 99)) == tuple(
            float(np.percentile(pooled, q)) * 1e3 for q in (50, 99))
        index = rec.request_gaps()
        assert index is not None
        for rid, got in zip(rows["req_id"], index.per_request(list(rows["req_id"])), strict=True):
            assert got.tobytes() == kept[rid].tobytes()


@pytest.mark.parametrize("n", [65, 100, 101, 102, 150, 400, 1001])
def test_p99_and_max_find_the_largest_anywhere(n: int) -> None:
    """The largest gap comes out of the same partition as the P99's two neighbours, wherever
    it stands among the gaps above the P99 (several of them for n > 200)."""
    rng = np.random.default_rng(n)
    for _ in range(20):
        values = rng.random(n)
        p99, largest = _p99_and_max(array("d", values.tolist()))
        assert largest == values.max()
        assert p99 == pytest.approx(float(np.percentile(values, 99)), rel=1e-12)


def test_merged_chunks_keep_per_step_offers_to_the_cache() -> None:
    """apply_stretch applies a chunked prompt's chunks after the first as one tile only where
    that offers the cache what each chunk in turn would: here the prompt's later blocks hold
    content cached on a finished request's evictable blocks, which per step its chunks find
    cached (left uncached) and then evict; one tile would evict first and cache them all."""
    hashes = [1000 + k for k in range(10)]

    def run(stretch: bool) -> tuple[list[int], int]:
        state = ReplicaState(num_layers=4, num_total_blocks=12, block_size=16)
        state.waiting = [RequestState(0, 0.0, 160, 1, hashes)]  # cached, finished, freed
        commit(state, (Tile(0, 0, 160, 0, 4, 0, True),), 1.0)
        state.waiting = [RequestState(1, 0.0, 160, 5, [7, *hashes[1:]])]  # no hit: block 0
        state.match_waiting()
        steps = [(Tile(1, 32 * j, 32 * (j + 1), 0, 4, 32 * j, j == 4),) for j in range(5)]
        ends = [2.0 + 0.1 * j for j in range(1, 6)]
        if stretch:
            apply_stretch(state, [], steps, ends)
        else:
            for tiles, end_s in zip(steps, ends, strict=True):
                state.apply(tiles, end_s)
        return sorted(h for h in [7, *hashes] if state.pool.cached_block(h) is not None), \
            state.pool.stats().num_evictions

    assert run(True) == run(False)
