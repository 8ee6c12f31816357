"""Capacity search against closed forms: a constant-service-time server."""

from __future__ import annotations

import pytest

from policies import PrefillFirst
from sim import simulate
from sim.capacity import max_rate, min_gpus, with_price
from tests.helpers import ConstantCost
from traces.request import Request

D = 0.02  # seconds per request


def evaluator(duration_s: float = 20.0, slo_ttft_ms: float = 1.5 * D * 1e3):
    """Deterministic arrivals at `rate` served one at a time in D: D/D/1. Below 1/D every
    request waits 0; above it the queue grows without bound and most requests miss the SLO."""
    cost = ConstantCost(D)

    def evaluate(rate: float, replicas: int):
        per = rate / replicas
        reqs = [Request(i, i / rate, 32, 1) for i in range(int(duration_s * rate))]
        return simulate(reqs, cost, lambda: PrefillFirst(max_num_seqs=1), num_replicas=replicas,
                        slo_ttft_ms=slo_ttft_ms, slo_itl_ms=1e9).metrics | {"per": per}
    return evaluate


def test_max_rate_finds_the_service_rate():
    ans = max_rate(evaluator(), target=0.9, start_rate=3.0, rel_tol=0.01)
    assert ans.point is not None
    assert ans.point.rate == pytest.approx(1 / D, rel=0.01)  # the search stops within rel_tol
    # ...of the lowest rate that missed: the bracket it stopped on
    bad = min(p.rate for p in ans.search if not p.meets and p.rate > ans.point.rate)
    assert (bad - ans.point.rate) / bad <= 0.01
    assert ans.point.rate <= 1 / D * 1.0001
    rates = [p.rate for p in ans.search]
    assert len(rates) == len(set(rates))


def test_min_gpus_for_a_rate():
    # 240 req/s with 50 req/s per replica: ceil(240 / 50) = 5 replicas
    ans = with_price(min_gpus(evaluator(duration_s=5.0), rate=240.0, target=0.9), 2.0)
    assert ans.point is not None and ans.point.replicas == 5
    summary = ans.summary()
    assert summary["gpus"] == 5
    assert summary["cost_per_million_tokens"] > 0


def test_rate_search_stops_at_the_fastest_rate_a_workload_may_have():
    """A replica that meets the SLO at every rate: doubling stops at the bound and answers it
    (it used to step past it into a workload error)."""
    from sim.capacity import rate_steps
    from traces.workload import MAX_RATE
    steps = rate_steps(start_rate=1e3)
    tried = [next(steps)]
    try:
        while True:
            tried.append(steps.send(True))
    except StopIteration as done:
        answer = done.value
    assert answer == MAX_RATE and tried[-1] == MAX_RATE and tried.count(MAX_RATE) == 1
    assert all(r <= MAX_RATE for r in tried) and tried[:3] == [1e3, 2e3, 4e3]
