"""Fast-forward of steady decoding and of prefill stretches (sim/fast_forward.py) against
step-by-step simulation.

Every built-in policy, on a few small workloads (arrivals that interrupt steady runs, KV
pressure with preemptions, a sliding-window model, prefix caching that hits, with and without
KV pressure), gives the same per-request token times (within 1e-9 s; to the bit on measured
kernel tables), the same counts and the same metrics with fast_forward on and off. And a
user's policy is fast-forwarded only on a promise that checked mode verifies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.state import PlanError, ReplicaState
from costmodel import CostModel, Parallelism, Tile, load_model, resolve_profile
from policies import ChunkedPrefill, LayeredPrefill
from sim import simulate
from tests.helpers import drive
from traces import Request, WorkloadSpec, build_workload

POLICIES = ["chunked:512", "layered", "layered:16", "hybrid:512", "adaptive:100", "prefill-first"]

# The per-token time tolerance the fast-forward must meet: its step ends are an arithmetic
# series from two priced steps, step-by-step sums each step's price; the two differ only by
# float rounding (~1e-16 relative per addition over runs of at most ~10^4 steps).
TOKEN_TIME_TOL_S = 1e-9
# Sums over iterations (energy, bytes) are interpolated linearly between the first and last
# steady step's price, which is exact for the affine cost; rounding only.
METRIC_REL = 1e-9


def _qwen() -> CostModel:
    return CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))


def _qwen_measured() -> CostModel:  # the shipped measured-kernel profile: every step priced
    return CostModel(load_model("qwen3-30b-a3b"), "h100", resolve_profile("h100"),
                     Parallelism(tp=2))


def _gpt_oss() -> CostModel:  # sliding-window attention on every other layer (window 128)
    return CostModel(load_model("gpt-oss-20b"), "h100", parallel=Parallelism(tp=2))


def _arxiv(seed: int) -> list[Request]:
    return build_workload(WorkloadSpec("arxiv-long", rate=1.5, duration_s=12, seed=seed)).requests


def _pressure() -> list[Request]:
    """Long outputs arriving together: 16 requests of 3000 + 400 tokens need 16 x 213 KV
    blocks of 16 tokens, and 600 are left (_tight): decodes must preempt."""
    return [Request(i, i * 0.02, 3000, 400) for i in range(16)]


def _tight(cm: CostModel, blocks: int) -> dict[str, float]:
    """simulate arguments that leave exactly `blocks` KV blocks of 16 tokens."""
    reserve = cm.hw.hbm_bytes - cm.weight_bytes_per_gpu - blocks * 16 * cm.kv_bytes_per_token_per_gpu
    return {"gpu_memory_utilization": 1.0, "activation_reserve_bytes": reserve}


def _crossing_the_window() -> list[Request]:
    """Prompts shorter than gpt-oss's 128-token window whose outputs cross it while decoding,
    arriving apart (arrivals interrupt steady runs), plus arxiv prompts already past it."""
    return [Request(100 + i, i * 0.05, 30 + 20 * i, 200) for i in range(6)] + list(_arxiv(5)[:4])


def _shared_prefix() -> list[Request]:
    """Prefix caching that hits: 4 system prompts of 1024 tokens shared by ~60 requests, each
    with its own 100-token question and 60 output tokens (traces/shared_prefix.py)."""
    return build_workload(WorkloadSpec("shared-prefix:4:1024:100:60", rate=5.0, duration_s=12,
                                       seed=3)).requests


def _shared_prefix_burst() -> list[Request]:
    """The same prompts, ~57 arriving within 1.5 s with 200 output tokens: in 300 KV blocks
    (_tight) cached blocks are evicted and decodes preempt, the victims hitting their own
    blocks (and the shared prompts) when they recompute."""
    return build_workload(WorkloadSpec("shared-prefix:4:1024:100:200", rate=40.0,
                                       duration_s=1.5, seed=3)).requests


def _short_outputs() -> list[Request]:
    """Prompts of one to five chunks whose first token is their last or nearly (one in four
    decodes on), in bursts (a last chunk leaves budget while others wait) and alone (a whole
    prefill is one stretch)."""
    return [Request(i, (i // 4) * 0.6 + i * 0.001, 300 + 433 * (i % 5), (1, 2, 3, 30)[i % 4])
            for i in range(16)]


WORKLOADS = {
    "arxiv": (_qwen, lambda: _arxiv(2), lambda cm: {}),
    "short-outputs": (_qwen, _short_outputs, lambda cm: {}),
    "kv-pressure": (_qwen, _pressure, lambda cm: _tight(cm, 600)),
    "sliding-window": (_gpt_oss, _crossing_the_window, lambda cm: {}),
    # measured kernel tables: decode attention's time is not affine in the KV read there, so
    # steady runs price every step (CostModel.decode_latencies_s)
    "measured-kernels": (_qwen_measured, lambda: _arxiv(4), lambda cm: {}),
    # prefix caching on (the default, said here) on a workload that hits; with KV pressure too,
    # so that cached blocks are evicted and preempted requests hit their own blocks
    "prefix-caching": (_qwen, _shared_prefix, lambda cm: {"enable_prefix_caching": True}),
    "prefix-caching-pressure": (_qwen, _shared_prefix_burst,
                                lambda cm: {"enable_prefix_caching": True, **_tight(cm, 300)}),
    # no prefix caching under KV pressure: requests wait that cannot be admitted, and chunked's
    # steady_while_blocked fast-forwards the decodes meanwhile
    "kv-pressure-no-cache": (_qwen, _pressure,
                             lambda cm: {"enable_prefix_caching": False, **_tight(cm, 600)}),
}


def _token_times(res, req_ids) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """Each request's output token times: the first token's, then one per gap after it."""
    rows = res.requests.set_index("req_id").loc[req_ids]
    gaps = res.itls.per_request(req_ids)
    return [first + np.concatenate(([0.0], np.cumsum(g))) if not math.isnan(first) else g
            for first, g in zip(rows["first_token_s"], gaps, strict=True)]


def _assert_same_run(fast, slow, tol_s: float = TOKEN_TIME_TOL_S) -> None:  # type: ignore[no-untyped-def]
    a, b = fast.requests, slow.requests
    assert a["req_id"].tolist() == b["req_id"].tolist()
    for col in ("output_tokens", "preemptions", "finished", "replica"):
        assert a[col].tolist() == b[col].tolist(), col
    ids = a["req_id"].tolist()
    for rid, ta, tb in zip(ids, _token_times(fast, ids), _token_times(slow, ids), strict=True):
        assert len(ta) == len(tb), rid
        assert np.max(np.abs(ta - tb), initial=0.0) <= tol_s, rid
    for key, value in slow.metrics.items():
        if isinstance(value, float):
            assert fast.metrics[key] == pytest.approx(value, rel=METRIC_REL, abs=1e-12), key
        else:
            assert fast.metrics[key] == value, key


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("policy", POLICIES)
def test_fast_forward_equals_step_by_step(policy, workload):
    make_cm, make_requests, make_kw = WORKLOADS[workload]
    cm, requests = make_cm(), make_requests()
    kw = make_kw(cm)
    fast = simulate(requests, cm, policy, fast_forward=True, **kw)
    slow = simulate(requests, cm, policy, fast_forward=False, **kw)
    # measured tables price every step: the same token times to the bit
    _assert_same_run(fast, slow, 0.0 if cm.measured is not None else TOKEN_TIME_TOL_S)
    assert fast.metrics["completed"] == len(requests)
    # it did fast-forward: fewer iteration rows than iterations
    assert len(fast.iterations) < fast.metrics["iterations"] == len(slow.iterations)
    if policy in ("chunked:512", "layered", "layered:16") and workload in (
            "arxiv", "kv-pressure", "sliding-window"):  # long prompts: prefill stretches
        it = fast.iterations
        assert ((it["prefill_layer_tokens"] > 0) & (it["iterations"] > 1)).any()  # stretches
    if workload.startswith("kv-pressure"):
        assert slow.metrics["preemptions"] > 0
    if workload.startswith("prefix-caching"):
        assert fast.metrics["prefix_cache_hit_rate"] > 0
    if workload == "prefix-caching-pressure":
        assert slow.metrics["preemptions"] > 0 and slow.metrics["prefix_cache_evictions"] > 0


# ---- a user's steady_decode promise, verified in checked mode -------------------------------

class _HonestSteady(ChunkedPrefill):
    """A user's copy of chunked prefill: not a registry built-in, so checked; it keeps the
    promise it inherits (steady_decode = True)."""

    def __init__(self) -> None:
        super().__init__(max_num_batched_tokens=512)
        self.name = "my-chunked"


class _SkipsADecode(_HonestSteady):
    """Claims steady_decode but decodes at most two requests an iteration."""

    stall_free = False

    def schedule(self, state: ReplicaState) -> tuple[Tile, ...]:
        plan = super().schedule(state)
        decoding = {r.req_id for r in state.decodes}
        keep = sorted(decoding)[:2]
        return tuple(t for t in plan if t.req_id not in decoding or t.req_id in keep)


class _HalfStackDecodes(_HonestSteady):
    """Stall-free, claims steady_decode, but with nothing waiting runs each decode through the
    first half of the layers (a legal plan: the rest would follow next iteration). Refused
    at the first steady state, before any such plan runs."""

    def schedule(self, state: ReplicaState) -> tuple[Tile, ...]:
        if state.waiting or len(state.decodes) != len(state.running):
            return super().schedule(state)
        half = state.num_layers // 2
        return tuple(Tile(r.req_id, r.num_computed_tokens, r.num_computed_tokens + 1, 0, half,
                          r.num_computed_tokens, False) for r in state.decodes)


def _steady_requests() -> list[Request]:
    return [Request(i, 0.0, 200 + 50 * i, 30) for i in range(4)]


def test_an_honest_steady_claim_is_fast_forwarded_with_the_same_results():
    cm, requests = _qwen(), _arxiv(2)
    fast = simulate(requests, cm, _HonestSteady, fast_forward=True)
    slow = simulate(requests, cm, _HonestSteady, fast_forward=False)
    _assert_same_run(fast, slow)
    assert len(fast.iterations) < fast.metrics["iterations"]  # checked, and still forwarded


@pytest.mark.parametrize("liar", [_SkipsADecode, _HalfStackDecodes])
def test_a_broken_steady_claim_is_refused_in_checked_mode(liar):
    with pytest.raises(PlanError, match="policy my-chunked.*broke its steady_decode promise"):
        simulate(_steady_requests(), _qwen(), liar, fast_forward=True)


def test_a_warm_up_window_cuts_every_replicas_runs():
    """The measured window opens at the first measured arrival, routed to one replica; the
    others' fast-forwarded runs must stop there too, or their iterations after it go uncounted
    (each row counts from its start)."""
    cm = _qwen()
    requests = [Request(0, 0.0, 500, 400), Request(1, 0.01, 500, 400), Request(2, 0.5, 500, 50)]
    kw = {"num_replicas": 2, "warmup_requests": 2}
    fast = simulate(requests, cm, "chunked:512", fast_forward=True, **kw)
    slow = simulate(requests, cm, "chunked:512", fast_forward=False, **kw)
    assert fast.metrics["iterations"] == slow.metrics["iterations"]
    assert fast.metrics["energy_j"] == pytest.approx(slow.metrics["energy_j"], rel=METRIC_REL)


def test_hybrid_chunks_wait_for_blocks_under_kv_pressure():
    """A part-way hybrid prompt's chunks through its first group take KV blocks as they go;
    under pressure the next chunk must wait for them, not be planned beyond the free blocks
    (it was: 'plan needs 10 more KV blocks for request 29, only 8 free'). Found by review."""
    cm = _qwen()
    rows = [(1, 0.6949, 4047, 271), (2, 0.8412, 5021, 422), (6, 1.5815, 5292, 155),
            (7, 1.8204, 5795, 375), (9, 1.8878, 3247, 234), (11, 2.1045, 3693, 296),
            (13, 2.181, 5311, 445), (14, 2.2386, 3028, 375), (15, 2.2946, 3637, 439),
            (16, 2.4803, 4575, 177), (19, 2.9748, 2110, 312), (20, 3.2735, 5463, 428),
            (21, 3.2911, 5014, 233), (22, 3.8911, 5352, 368), (23, 3.9216, 4153, 198),
            (24, 4.0719, 5270, 247), (25, 4.2324, 3319, 441), (26, 4.4563, 3811, 276),
            (27, 4.5346, 5154, 305), (28, 5.3527, 2495, 238), (29, 5.6476, 3213, 184)]
    requests = [Request(*r) for r in rows]
    kw = _tight(cm, 1500)
    fast = simulate(requests, cm, "hybrid:128", check=True, **kw)
    slow = simulate(requests, cm, "hybrid:128", check=True, fast_forward=False, **kw)
    _assert_same_run(fast, slow)
    assert fast.metrics["completed"] == len(requests)


# ---- steady decoding while requests wait that cannot be admitted (steady_while_blocked) -----

def _blocked_runs(monkeypatch, make_policy_, requests, **kw):  # type: ignore[no-untyped-def]
    """(fast-forwarded with the promise, without it, step by step) on the same run."""
    cm = _qwen()
    with_promise = simulate(requests, cm, make_policy_, **kw)
    monkeypatch.setattr(ChunkedPrefill, "steady_while_blocked", False)
    without = simulate(requests, cm, make_policy_, **kw)
    slow = simulate(requests, cm, make_policy_, fast_forward=False, **kw)
    return with_promise, without, slow


@pytest.mark.parametrize("blocked_by", ["max_num_seqs", "kv-blocks"])
def test_decodes_are_fast_forwarded_while_the_waiting_cannot_be_admitted(monkeypatch, blocked_by):
    """Twelve requests at once behind max_num_seqs = 4 (or in 600 KV blocks, no prefix
    caching): the same token times as step by step, in fewer executed iterations than the
    fast-forward that waits for an empty queue."""
    from policies.registry import make_policy

    if blocked_by == "max_num_seqs":
        requests = [Request(i, 0.0, 300 + 40 * i, 120) for i in range(12)]
        runs = _blocked_runs(monkeypatch, lambda: make_policy("chunked:512", max_num_seqs=4),
                             requests, enable_prefix_caching=False)
    else:
        runs = _blocked_runs(monkeypatch, lambda: make_policy("chunked:512"), _pressure(),
                             enable_prefix_caching=False, **_tight(_qwen(), 600))
    with_promise, without, slow = runs
    _assert_same_run(with_promise, slow)
    _assert_same_run(without, slow)
    assert with_promise.metrics["completed"] == slow.metrics["completed"] > 0
    assert len(with_promise.iterations) < len(without.iterations)


def test_no_blocked_fast_forward_with_prefix_caching(monkeypatch):
    """With prefix caching a block cached or evicted meanwhile could change a waiting prompt's
    cost, so the promise is not used: the same iteration rows with it as without."""
    from policies.registry import make_policy

    requests = [Request(i, 0.0, 300 + 40 * i, 120) for i in range(12)]
    with_promise, without, slow = _blocked_runs(
        monkeypatch, lambda: make_policy("chunked:512", max_num_seqs=4), requests,
        enable_prefix_caching=True)
    _assert_same_run(with_promise, slow)
    assert len(with_promise.iterations) == len(without.iterations)


# ---- prefill_ahead's promise, checked against the policy asked every iteration ---------------
@pytest.mark.parametrize("policy", [ChunkedPrefill(512), LayeredPrefill(), LayeredPrefill(4)])
@pytest.mark.parametrize("seed", range(6))
def test_prefill_ahead_promises_what_the_policy_then_plans(policy, seed: int) -> None:
    """Each promise (the prompt tiles of the iterations after a plan) is what the policy plans
    in those iterations while no request arrives, finishes or is preempted: the simulator's
    prefill stretches stop at those. Prompts of a few chunks, some with one output token
    (their last chunk would finish them: not promised), arriving alone and in bursts (a
    request waiting beside a last chunk that leaves budget would start in it: not promised)."""
    rng = np.random.default_rng(seed)
    prompts = [(int(a), int(p), int(o)) for a, p, o in zip(
        np.sort(rng.integers(0, 60, 14)), rng.integers(1, 2200, 14),
        rng.choice([1, 2, 5, 40], 14), strict=True)]
    promised: list[tuple[Tile, ...]] = []
    seen: dict[str, object] = {"kept": 0}

    def on_plan(state: ReplicaState, plan: tuple[Tile, ...]) -> None:
        nonlocal promised
        prompt_tiles = plan[len(state.decodes):]
        ids = (frozenset(r.req_id for r in state.running), frozenset(r.req_id for r in state.waiting))
        if promised and ids == seen.get("expect"):
            assert prompt_tiles == promised.pop(0)
            seen["kept"] = int(seen["kept"]) + 1  # type: ignore[call-overload]
        else:
            promised = []
        started = {t[0] for t in prompt_tiles} - ids[0]
        seen["expect"] = (ids[0] | started, ids[1] - started)
        if not promised and prompt_tiles and not any(t[6] for t in prompt_tiles):
            promised = list(policy.prefill_ahead(state, plan))

    drive(policy, prompts, num_layers=48, on_plan=on_plan)
    assert int(seen["kept"]) > 3  # type: ignore[call-overload]


@pytest.mark.parametrize(("policy", "output", "rows"), [
    ("chunked:512", 5, [4]), ("chunked:512", 1, [3, 1]), ("layered", 5, [4]), ("layered", 1, [3, 1])])
def test_a_prompts_whole_prefill_is_one_stretch(policy: str, output: int, rows: list[int]) -> None:
    """A prompt of four chunks (layer groups) alone: its first iteration starts it, its last
    emits its first token, and all four are one fast-forwarded stretch, unless that token is
    its last (the stretch stops short, the last iteration runs alone)."""
    res = simulate([Request(0, 0.0, 2000, output)], _qwen(), policy)
    assert res.iterations["iterations"].tolist()[:len(rows)] == rows
    slow = simulate([Request(0, 0.0, 2000, output)], _qwen(), policy, fast_forward=False)
    _assert_same_run(res, slow)


def test_a_layered_stretch_frees_hidden_states_after_the_decodes_grow() -> None:
    """A stretch that ends with a layered batch's last group frees the batch's hidden states
    in that iteration, after the decodes took their blocks: with no free block left, a step
    evicts a cached block for a decode's next block, and so must the stretch, not take a
    hidden-state block the batch frees (it did: one eviction fewer, and request 3 then hit a
    block that step by step had evicted). Found by review."""
    cm = _qwen()
    requests = [Request(0, 0.0, 10, 300),  # decodes throughout, a new block every 16 tokens
                Request(1, 0.001, 1600, 1, tuple(range(100)), 16),  # leaves 100 cached blocks
                Request(2, 0.5, 1500, 5),  # a layered batch of three groups: one stretch
                Request(3, 3.0, 1600, 2, tuple(range(100)), 16)]  # hits what is left cached
    kw = {"enable_prefix_caching": True, **_tight(cm, 130)}
    fast = simulate(requests, cm, "layered", fast_forward=True, **kw)
    slow = simulate(requests, cm, "layered", fast_forward=False, **kw)
    assert slow.metrics["prefix_cache_evictions"] > 0
    _assert_same_run(fast, slow)


def test_a_decode_workers_preemption_does_not_skip_its_next_planning_point() -> None:
    """A decode worker tries its queued KV reservations at a planning point before prepare
    preempts a decode for blocks; the blocks the victim frees are the next planning point's to
    give. A prefill stretch (here the victim's recompute, started by the plan that re-admits
    it) must not pass that planning point: it did, and the reservation, the request's transfer
    and its decoding all came an iteration late. Found by review."""
    from sim.disagg import Pool, simulate_disagg
    rows = [(0.0108, 903, 175), (0.029, 2943, 140), (0.0804, 1595, 151), (0.0818, 2674, 79),
            (0.139, 25, 191), (0.174, 50, 124), (0.2301, 2482, 123), (0.2516, 1499, 154),
            (0.2616, 2166, 153), (0.2909, 2175, 16), (0.3106, 2040, 74), (0.3158, 1881, 130),
            (0.3348, 941, 29), (0.3458, 790, 191), (0.3478, 1563, 31), (0.3649, 1621, 135),
            (0.401, 1522, 30), (0.4012, 144, 37), (0.4013, 663, 133), (0.4515, 593, 192),
            (0.4779, 2304, 18), (0.4872, 447, 173), (0.4946, 399, 147)]
    requests = [Request(i, a, p, o) for i, (a, p, o) in enumerate(rows)]
    cm = _qwen()
    fast, slow = (simulate_disagg(requests, Pool(cm, "chunked:512", 2), Pool(cm, "chunked:512", 1),
                                  None, fast_forward=ff, stream_kv=True, gpu_memory_utilization=0.45)
                  for ff in (True, False))
    assert slow.metrics["preemptions"] > 0
    cols = ["req_id", "ttft_ms", "e2el_ms", "kv_end_s", "output_tokens"]
    a, b = (r.requests.sort_values("req_id")[cols].to_numpy(float) for r in (fast, slow))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", ["another shard's", "rejected"])
def test_the_warm_up_window_cuts_runs_where_its_request_is_not_sent(case: str) -> None:
    """The measured window opens at the first measured request's arrival; every replica's
    fast-forwarded run must stop there, also on a shard (--workers) that the request is not
    routed to, and where the request is rejected (over the context) and never sent: neither
    opened the window, and the iterations of a run straddling it went uncounted. Found by
    review."""
    cm = _qwen()
    if case == "rejected":
        requests = [Request(0, 0.0, 500, 400), Request(1, 0.2, 10**6, 5),
                    Request(2, 0.9, 500, 50)]
        kw: dict[str, int] = {"warmup_requests": 1}
    else:
        requests = [Request(0, 0.0, 500, 400), Request(1, 0.01, 500, 400),
                    Request(2, 0.5, 500, 50)]
        kw = {"num_replicas": 2, "warmup_requests": 2, "workers": 2}
    fast = simulate(requests, cm, "chunked:512", fast_forward=True, **kw)
    slow = simulate(requests, cm, "chunked:512", fast_forward=False, **kw)
    assert fast.metrics["iterations"] == slow.metrics["iterations"]
    assert fast.metrics["energy_j"] == pytest.approx(slow.metrics["energy_j"], rel=METRIC_REL)


def _bits(res):  # type: ignore[no-untyped-def]
    ids = res.requests["req_id"].tolist()
    return [t.tolist() for t in _token_times(res, ids)], res.requests["finish_s"].tolist()


@pytest.mark.parametrize("policy", ["chunked:512", "layered"])
def test_a_run_ends_where_stepping_does_to_the_bit(policy: str) -> None:
    """On measured tables every step is priced, so token times equal step by step's to the
    bit. Two ways a run used to end an ulp early: waited for as end - start (inexact where the
    run lasts over twice as long as the clock stood at its start), and woken by an arrival an
    ulp before its end (taken as the end). Here a second request arrives an ulp before the
    first one's last token, which ends a steady run; found by review."""
    cm = _qwen_measured()
    alone = simulate([Request(0, 0.0, 300, 60)], cm, policy, fast_forward=False)
    end_s = float(alone.requests["finish_s"].iloc[0])
    requests = [Request(0, 0.0, 300, 60), Request(1, math.nextafter(end_s, 0.0), 300, 60)]
    fast = simulate(requests, cm, policy, fast_forward=True)
    slow = simulate(requests, cm, policy, fast_forward=False)
    assert len(fast.iterations) < len(slow.iterations)  # it fast-forwarded
    assert _bits(fast) == _bits(slow)
    assert slow.requests["finish_s"].iloc[0] == end_s  # the arrival fell in the last step


def test_hops_land_exactly_on_the_end() -> None:
    """end - now is inexact where now is under half of end, and some ends cannot be reached
    from now in one addition at all (now's last bit halves the grid, ties round to even):
    wait_until's hops reach every end from every clock, in at most two."""
    import simpy

    from sim.fast_forward import wait_until
    now, end = 0.5431698578833152, 1.8496675077613138
    assert now + (end - now) != end  # the plain difference misses
    nearby = [end - now + k * 2.0**-52 for k in range(-4, 5)]  # the delays' grid near it
    assert not any(now + d == end for d in nearby)  # no single delay lands
    rng = np.random.default_rng(3)
    pairs = [(now, end), *rng.uniform(0.0, 50.0, (2000, 2)).tolist(), (0.0, end), (end, end)]
    hops: list[int] = []

    def go(env: simpy.Environment, end_s: float):  # type: ignore[no-untyped-def]
        for event in wait_until(env, end_s):
            hops[-1] += 1
            yield event
    for now, end in pairs:
        env = simpy.Environment(initial_time=now)
        hops.append(0)
        env.process(go(env, end))
        env.run()
        assert env.now == max(now, end) and hops[-1] <= 2
    assert max(hops) == 2  # some needed the second hop
