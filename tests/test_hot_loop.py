"""The simulator's hot-loop shortcuts (issue 15) give exactly what the plain code gave.

Each shortcut is checked against the computation it replaces: the per-request 99th percentile
against numpy's, a table's column-wise frame against pandas' row inference, the memoised
datasheet terms against the roofline written out, and the garbage collector's settings are
restored after a run.
"""

from __future__ import annotations

import gc
import random
from array import array

import numpy as np
import pandas as pd
import pytest

from core.records import Table, _p99_and_max
from costmodel import CostModel, Parallelism, load_model
from costmodel.coefficients import _HBM, _OP_INDEX, _QUANTITIES, FEATURES
from sim import simulate
from traces import Request


@pytest.mark.parametrize("n", [1, 2, 3, 99, 100, 101, 150, 1000])
def test_p99_and_max_equal_numpy(n: int) -> None:
    rng = random.Random(n)
    for _ in range(20):
        values = [rng.choice([rng.random(), 0.5, -rng.random()]) for _ in range(n)]
        if n % 2:  # as a request's gaps are kept: a float array
            values = array("d", values)  # type: ignore[assignment]
        p99, top = _p99_and_max(values)
        v = sorted(values)  # the full sort it replaces, bit for bit
        pos = (n - 1) * 99.0 / 100
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        assert p99 == v[lo] + (v[hi] - v[lo]) * (pos - lo)
        assert p99 == pytest.approx(float(np.percentile(values, 99.0)), rel=1e-12, abs=1e-15)
        assert top == max(values)


def test_table_frame_matches_pandas_row_inference() -> None:
    rows = [(7, 0.5, True, 2**62, float("nan")), (8, 1.5, False, -3, 2.0)]
    t = Table("t", ("a", "b", "flag", "big", "maybe"), ("a", "big"), None, 10)
    for r in rows:
        t.append(r)
    got = t.frame()
    want = pd.DataFrame.from_records(rows, columns=["a", "b", "flag", "big", "maybe"])
    pd.testing.assert_frame_equal(got, want)
    assert list(got.dtypes.astype(str)) == ["int64", "float64", "bool", "int64", "float64"]


def test_datasheet_op_terms_equal_the_roofline_written_out() -> None:
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    for op, feature in (("embedding", "embed"), ("norms_elementwise", "tm")):
        i, f = _OP_INDEX[op], FEATURES.index(feature)
        for tokens in (1, 7.5, 512, 65536):
            flops = cm._K[_QUANTITIES.index("flops"), i, f] * tokens
            hbm = sum(cm._K[_QUANTITIES.index(q), i, f] for q in _HBM)
            t_c, t_m = flops * cm._inv_compute[i], hbm * tokens * cm._inv_memory[i]
            assert cm._datasheet_op(op, tokens, feature) == float(cm._overhead[i] + max(t_c, t_m))


def test_a_run_restores_the_garbage_collector() -> None:
    before = gc.get_threshold()
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    simulate([Request(i, 0.1 * i, 64, 8) for i in range(5)], cm, "chunked:512")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


# ---- load-ordered routers: a heap, exactly the scan's answer ---------------------------------

class _Fake:
    def __init__(self, outstanding: int, pending_tokens: int) -> None:
        self.outstanding, self.pending_tokens = outstanding, pending_tokens


@pytest.mark.parametrize("name,attr", [("least-outstanding", "outstanding"),
                                       ("jsq-tokens", "pending_tokens")])
def test_ordered_routers_pick_what_a_scan_picks(name: str, attr: str) -> None:
    """Random load changes, each reported; after each, the pick is the first replica of least
    load (the scan the heap replaced). Small loads make ties common."""
    from sim.router import make_router
    rng = random.Random(7)
    reps = [_Fake(rng.randrange(4), rng.randrange(4)) for _ in range(9)]
    router = make_router(name)
    for _ in range(3000):
        for _ in range(rng.randrange(4)):
            i = rng.randrange(len(reps))
            setattr(reps[i], attr, max(0, getattr(reps[i], attr) + rng.choice([-1, 1, 2])))
            router.changed(i)
        want = min(range(len(reps)), key=lambda i: getattr(reps[i], attr))
        assert router.pick(reps) == want
        # stale entries are dropped by a rebuild once they outnumber replicas 4 to 1
        assert len(router._heap) <= 4 * len(reps) + 3  # type: ignore[attr-defined]


def test_an_unreported_change_is_what_the_heap_relies_on() -> None:
    """The contract: a change must be reported. A replica whose load fell unreported is not
    seen (the test above would fail if `changed` were ignored)."""
    from sim.router import make_router
    reps = [_Fake(2, 0), _Fake(3, 0)]
    router = make_router("least-outstanding")
    assert router.pick(reps) == 0
    reps[1].outstanding = 0
    assert router.pick(reps) == 0  # not told
    router.changed(1)
    assert router.pick(reps) == 1


def _checked_runs():  # type: ignore[no-untyped-def]
    """Runs whose pending tokens move every way: preemptions (tight KV), prefix hits,
    part-way layer groups; in checked mode the replica compares its running sum with a
    recount after every step."""
    from traces import WorkloadSpec, build_workload
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    tight = cm.hw.hbm_bytes - cm.weight_bytes_per_gpu - 400 * 16 * cm.kv_bytes_per_token_per_gpu
    burst = [Request(i, i * 0.02, 3000, 300) for i in range(12)]
    shared = build_workload(WorkloadSpec("shared-prefix:3:1024:100:40", rate=8.0, duration_s=4,
                                         seed=2)).requests
    return cm, [(burst, {"gpu_memory_utilization": 1.0, "activation_reserve_bytes": tight}),
                (shared, {})]


@pytest.mark.parametrize("policy", ["chunked:512", "layered", "hybrid:512"])
def test_pending_tokens_running_sum_equals_a_recount(policy: str) -> None:
    cm, runs = _checked_runs()
    for requests, kw in runs:
        res = simulate(requests, cm, policy, num_replicas=2, router="jsq-tokens", check=True, **kw)
        assert res.metrics["completed"] == len(requests)
    assert simulate(runs[0][0], cm, policy, num_replicas=1, check=True,
                    **runs[0][1]).metrics["preemptions"] > 0


def test_ordered_routers_route_as_the_scan_did() -> None:
    """The same run with the heap routers and with scanning ones (the code they replaced)."""
    import sim.router as router_mod
    cm, runs = _checked_runs()
    requests = runs[1][0]

    class ScanJsq(router_mod.Router):
        name = "jsq-tokens"

        def pick(self, replicas):  # type: ignore[no-untyped-def]
            return min(range(len(replicas)), key=lambda i: replicas[i].pending_tokens)

    heap = simulate(requests, cm, "chunked:512", num_replicas=3, router="jsq-tokens")
    saved = router_mod.ROUTERS["jsq-tokens"]
    router_mod.ROUTERS["jsq-tokens"] = ScanJsq
    try:
        scan = simulate(requests, cm, "chunked:512", num_replicas=3, router="jsq-tokens")
    finally:
        router_mod.ROUTERS["jsq-tokens"] = saved
    pd.testing.assert_frame_equal(heap.requests, scan.requests)
    assert heap.requests["replica"].nunique() == 3


def _cyclic_garbage(requests: list[Request]) -> int:
    """Objects a run leaves to the cyclic collector (reference counting cannot free them)."""
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100")
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, counted
    try:
        simulate(requests, cm, "chunked:512")
        gc.collect()
        return len(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_a_run_leaves_no_cycles_per_request() -> None:
    """Ten times the requests (arrivals that cut steady runs, prompts long enough for prefill
    stretches) leave no more cycles: the collector's work must not grow with the run (a
    fast-forward timer whose callback referred to itself left one per run)."""
    def workload(n: int) -> list[Request]:
        return [Request(i, 0.05 * i, 300 + 700 * (i % 3), 40) for i in range(n)]
    few, many = _cyclic_garbage(workload(30)), _cyclic_garbage(workload(300))
    assert many - few < 10, (few, many)
