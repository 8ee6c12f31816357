"""Users' policies that misbehave get named errors; no request ever vanishes from the results."""

from __future__ import annotations

import pytest

from costmodel import CostModel, Parallelism, load_model
from policies.state import PlanError
from sim import simulate
from traces import WorkloadSpec, build_workload
from traces.request import Request

BAD = "tests/fixtures/bad_policies.py"


@pytest.fixture(scope="module")
def cm():
    return CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))


@pytest.fixture(scope="module")
def requests():
    return build_workload(WorkloadSpec("arxiv-long", rate=4.0, duration_s=5, seed=0)).requests


def test_policy_exception_names_file_and_line(cm, requests):
    where = r"policy boom raised RuntimeError: out of ideas \(.*bad_policies.py:\d+\)"
    with pytest.raises(PlanError, match=where):
        simulate(requests, cm, f"{BAD}:Boom")


def test_policy_that_mutates_state_is_stopped(cm, requests):
    with pytest.raises(PlanError, match="changed the replica state"):
        simulate(requests, cm, f"{BAD}:Mutator")


def test_a_policy_may_wait_and_every_request_is_accounted_for(cm):
    reqs = [Request(i, float(i), 1000, 5) for i in range(5)]  # an odd one out at the end
    res = simulate(reqs, cm, f"{BAD}:WaitForTwo")
    assert sorted(res.requests["req_id"]) == list(range(5))
    assert res.metrics["completed"] == 4 and res.metrics["unfinished"] == 1


def test_prompt_larger_than_the_kv_cache_is_rejected_not_deadlocked():
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100")
    reqs = [Request(0, 0.0, 20000, 5), Request(1, 0.1, 1000, 5), Request(2, 0.2, 1000, 5)]
    for policy in ("chunked:512", "layered", "prefill-first", "hybrid", "adaptive:30"):
        res = simulate(reqs, cm, policy, gpu_memory_utilization=0.83)
        assert sorted(res.requests["req_id"]) == [0, 1, 2], policy
        done = res.requests.set_index("req_id")["finished"]
        assert not done[0] and done[1] and done[2], policy


def test_adaptive_with_an_impossible_target_still_serves_lone_prompts(cm):
    reqs = [Request(i, i * 2.0, 3000, 3) for i in range(4)]
    res = simulate(reqs, cm, "adaptive:0.2")
    assert res.metrics["completed"] == 4
