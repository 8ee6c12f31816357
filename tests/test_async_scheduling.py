"""vLLM's async scheduling (`async_scheduling`, sim/replica.py): a request that arrives while an
iteration runs is first planned into the iteration after next."""

from __future__ import annotations

import pytest

from sim import simulate
from tests.helpers import ConstantCost
from tests.test_fast_forward import WORKLOADS, _assert_same_run
from traces import Request

C = 0.01  # every iteration takes 10 ms


def _first_token_s(res, req_id: int) -> float:  # type: ignore[no-untyped-def]
    rows = res.requests.set_index("req_id")
    return float(rows.loc[req_id, "first_token_s"])


@pytest.mark.parametrize("async_on", [False, True])
def test_an_arrival_mid_iteration_waits_one_more_iteration(async_on: bool) -> None:
    """A (prompt 8, 20 tokens) alone from t = 0; B arrives at 0.5 C, while iteration 0 runs.
    Synchronously B joins iteration 1 and its first token comes at 2 C; with async scheduling
    iteration 1 was planned while 0 ran, so B joins iteration 2: first token at 3 C."""
    reqs = [Request(0, 0.0, 8, 20), Request(1, 0.5 * C, 8, 20)]
    res = simulate(reqs, ConstantCost(C), "chunked:512", async_scheduling=async_on)
    assert _first_token_s(res, 0) == pytest.approx(C)  # A: the replica was idle, no wait
    assert _first_token_s(res, 1) == pytest.approx((3 if async_on else 2) * C)
    assert res.metrics["completed"] == 2


def test_a_replica_with_nothing_else_planned_takes_the_arrival_at_once() -> None:
    """A's last token comes out of iteration 2 (prompt, then 2 decodes); B arrives during it.
    Nothing else was planned for iteration 3, so B joins it, async or not."""
    reqs = [Request(0, 0.0, 8, 3), Request(1, 2.5 * C, 8, 5)]
    sync = simulate(reqs, ConstantCost(C), "chunked:512")
    both = simulate(reqs, ConstantCost(C), "chunked:512", async_scheduling=True)
    assert _first_token_s(sync, 1) == _first_token_s(both, 1) == pytest.approx(4 * C)


@pytest.mark.parametrize("workload", ["arxiv", "kv-pressure", "measured-kernels"])
@pytest.mark.parametrize("policy", ["chunked:512", "layered"])
def test_fast_forward_equals_step_by_step_with_async_scheduling(policy: str, workload: str) -> None:
    make_cm, make_requests, make_kw = WORKLOADS[workload]
    cm, requests = make_cm(), make_requests()
    kw = {**make_kw(cm), "async_scheduling": True}
    fast = simulate(requests, cm, policy, fast_forward=True, **kw)
    slow = simulate(requests, cm, policy, fast_forward=False, **kw)
    _assert_same_run(fast, slow)
    assert fast.metrics["completed"] == len(requests)
    assert len(fast.iterations) < len(slow.iterations)  # it still fast-forwarded
    sync = simulate(requests, cm, policy, fast_forward=True, **make_kw(cm))
    if workload == "kv-pressure":  # one burst at t = 0, before any iteration: nothing waits
        assert fast.metrics["mean_ttft_ms"] == sync.metrics["mean_ttft_ms"]
    else:  # Poisson arrivals, mostly mid-iteration: they wait longer
        assert fast.metrics["mean_ttft_ms"] > sync.metrics["mean_ttft_ms"]


def test_closed_loop_clients_join_the_iteration_after_next() -> None:
    """Two clients, constant service. Request 0 (4 tokens) ends with iteration 3 while request 1
    (7 tokens) still decodes; its client sends request 2 at that end, once iteration 4 has
    started (the engine does not wait for it): synchronously request 2 joins iteration 5, first
    token at 6 C; with async scheduling iteration 5 was planned while 4 ran, so it joins 6."""
    reqs = [Request(0, 0.0, 8, 4), Request(1, 0.0, 8, 7), Request(2, 0.0, 8, 3)]
    sync = simulate(reqs, ConstantCost(C), "chunked:512", max_concurrency=2)
    both = simulate(reqs, ConstantCost(C), "chunked:512", max_concurrency=2, async_scheduling=True)
    assert _first_token_s(sync, 2) == pytest.approx(6 * C)
    assert _first_token_s(both, 2) == pytest.approx(7 * C)
    assert _first_token_s(both, 1) == _first_token_s(sync, 1) == pytest.approx(C)


def test_jsq_tokens_counts_requests_waiting_to_be_planned() -> None:
    """A (27 tokens to go) and B (199) start at once on idle replicas 0 and 1; C (309) arrives
    mid-iteration and goes to replica 0, where it waits to be planned. D then sees replica 0
    holding 27 + 309 tokens against replica 1's 199, and goes to replica 1 (as vLLM's queue
    would count it), not to a replica 0 that looks nearly idle."""
    reqs = [Request(0, 0.0, 8, 20), Request(1, 0.5 * C, 100, 100), Request(2, 0.6 * C, 300, 10),
            Request(3, 0.7 * C, 8, 4)]
    res = simulate(reqs, ConstantCost(C), "chunked:512", num_replicas=2, router="jsq-tokens",
                   async_scheduling=True)
    replica = res.requests.set_index("req_id")["replica"]
    assert [int(replica.loc[i]) for i in range(4)] == [0, 1, 0, 1]
