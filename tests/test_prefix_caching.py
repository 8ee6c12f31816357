"""Prefix caching through the serving core, the policies, the workloads and the metrics.

Hand-worked cases: 16-token blocks, a 64-token system prompt (4 shared blocks) before a
16-token question, so a request that follows a finished one with the same system prompt hits
64 of its 80 prompt tokens, and its first tile starts at token 64.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from core.blocks import trace_block_hashes
from core.request import RequestState
from core.state import PlanError, ReplicaState
from core.step import RUN, commit, prepare
from costmodel import Parallelism, Tile, load_model
from costmodel.price import CostModel
from policies.registry import make_policy
from sim.cluster import simulate
from tests.helpers import ConstantCost
from traces import Request
from traces.workload import WorkloadSpec, build_workload

BS, PREFIX, QUESTION = 16, 64, 16
POLICIES = ["chunked:512", "chunked:32", "layered", "prefill-first", "hybrid:32", "adaptive:50"]


def _hashes(system_prompt: int, req_id: int) -> list[int]:
    """Trace ids at a 64-token block size: the system prompt's, then the request's own."""
    return trace_block_hashes((system_prompt, 1000 + req_id), PREFIX, PREFIX + QUESTION, BS)


def _serve(policy: str, requests: list[RequestState], enable: bool = True, num_blocks: int = 200
           ) -> tuple[ReplicaState, list[tuple[Tile, ...]]]:
    """Requests arrive one by one once the previous has finished; plans checked as a user's."""
    state = ReplicaState(num_layers=4, num_total_blocks=num_blocks, block_size=BS,
                         hidden_blocks_per_token=0.05, cost_model=ConstantCost(0.01),
                         enable_prefix_caching=enable)
    pol = make_policy(policy)
    plans: list[tuple[Tile, ...]] = []
    now = 0.0
    for req in requests:
        state.waiting.append(req)
        while state.waiting or state.running:
            step = prepare(state, pol, now, checked=True, on_preempt=lambda r: None)
            assert step.action is RUN
            plans.append(step.plan)
            now += 0.01
            commit(state, step.plan, now)
    return state, plans


def _pair(same_prompt: bool = True) -> list[RequestState]:
    return [RequestState(0, 0.0, PREFIX + QUESTION, 3, _hashes(7, 0)),
            RequestState(1, 0.0, PREFIX + QUESTION, 3, _hashes(7 if same_prompt else 8, 1))]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_starts_after_the_cached_prefix(policy: str) -> None:
    a, b = _pair()
    state, plans = _serve(policy, [a, b])
    first_b = next(t for plan in plans for t in plan if t.req_id == 1)
    assert (first_b.t0, first_b.num_cached) == (PREFIX, PREFIX)  # cached 64 tokens skipped
    assert sum(t.t1 - t.t0 for plan in plans for t in plan if t.req_id == 1 and t.l0 == 0) == 16 + 2
    assert a.num_cached_tokens == -1 and b.num_cached_tokens == -1  # freed: tables reset
    stats = state.pool.stats()
    # two admissions of 80 tokens (5 blocks each); the second hit 4 blocks
    assert (stats.queried_tokens, stats.hit_tokens, stats.queried_blocks, stats.hit_blocks) == (
        160, 64, 10, 4)
    assert stats.hit_rate == pytest.approx(0.4)
    assert b.is_finished and b.first_token_s is not None


@pytest.mark.parametrize("policy", ["chunked:512", "layered"])
def test_without_caching_or_another_system_prompt_nothing_is_skipped(policy: str) -> None:
    for requests, enable in ((_pair(), False), (_pair(same_prompt=False), True)):
        state, plans = _serve(policy, requests, enable)
        first_b = next(t for plan in plans for t in plan if t.req_id == 1)
        assert first_b.t0 == 0
        assert state.pool.stats().hit_tokens == 0


def test_hit_is_matched_while_waiting_taken_at_admission_and_blocks_are_shared() -> None:
    a, b, c = *_pair(), RequestState(2, 0.0, PREFIX + QUESTION, 3, _hashes(7, 2))
    state, _ = _serve("chunked:512", [a])
    cached = [state.pool.cached_block(h) for h in a.block_table.block_hashes[:4]]
    assert None not in cached
    state.waiting += [b, c]
    assert b.num_computed_tokens == 0  # not matched yet: the scheduler has not looked
    step = prepare(state, make_policy("chunked:512"), 1.0, checked=True, on_preempt=lambda r: None)
    assert b.num_computed_tokens == c.num_computed_tokens == PREFIX and b.num_cached_tokens == -1
    assert [t.t0 for t in step.plan] == [PREFIX, PREFIX]
    commit(state, step.plan, 2.0)
    assert b.num_cached_tokens == c.num_cached_tokens == PREFIX
    assert b.block_table.block_ids[:4] == c.block_table.block_ids[:4] == cached  # shared
    assert [state.pool.ref_counts[x] for x in cached] == [2, 2, 2, 2]
    assert state.memory_error() is None


def test_a_plan_that_ignores_the_hit_is_refused() -> None:
    a, b = _pair()
    state, _ = _serve("chunked:512", [a])
    state.waiting.append(b)
    state.match_waiting()
    with pytest.raises(PlanError, match="does not start where those layers stand"):
        state.check((Tile(1, 0, 80, 0, 4, 0, True),), stall_free=True)
    # an executor that skips the match gets a PlanError, not a silent recompute
    b.num_computed_tokens = 0
    with pytest.raises(PlanError, match="cached prefix is 64 tokens"):
        state.apply((Tile(1, 0, 80, 0, 4, 0, True),), 1.0)


def test_cached_blocks_are_evicted_lru_when_memory_is_needed() -> None:
    """10 blocks. A ends holding 6 blocks (82 tokens computed), ids 0-5; the 5 full prompt
    blocks are cached. Freed tail first: 5 (no hash) is free, 4, 3, 2, 1, 0 evictable in that
    order. A 142-token request without hashes takes 9 blocks: 5, the fresh 6-9, then evicts
    4, 3, 2, 1 (least recently used first). B's prefix chain still hits block 0: 16 tokens."""
    a, b = _pair()
    big = RequestState(5, 0.0, 140, 3)  # 142 tokens computed at its last step: 9 blocks
    state, plans = _serve("chunked:512", [a, big, b], num_blocks=10)
    first_b = next(t for plan in plans for t in plan if t.req_id == 1)
    assert first_b.t0 == 16 and state.pool.stats().num_evictions == 4
    assert b.is_finished


# ---- workloads ----------------------------------------------------------------------------------
def test_mooncake_hash_ids_reach_the_requests() -> None:
    reqs = build_workload(WorkloadSpec("mooncake", num_requests=3)).requests
    first = Path(__file__).resolve().parents[1] / "traces" / "data" / "mooncake_synthetic.jsonl"
    row = json.loads(first.open().readline())
    assert reqs[0].hash_ids == tuple(row["hash_ids"]) and reqs[0].hash_block_size == 512
    assert reqs[0].prompt_tokens == row["input_length"]


def test_shared_prefix_workload_is_deterministic_and_shares_exactly_the_system_prompt() -> None:
    spec = WorkloadSpec("shared-prefix:3:100:40:5", rate=1.0, num_requests=50, seed=4)
    w = build_workload(spec)
    assert w.requests == build_workload(spec).requests
    assert all(r.prompt_tokens == 140 and r.output_tokens == 5 for r in w.requests)
    assert {r.hash_ids[0] for r in w.requests} == {0, 1, 2}
    assert all(r.hash_ids[1:] == (3 + r.req_id,) and r.hash_block_size == 100 for r in w.requests)
    other = build_workload(WorkloadSpec("shared-prefix:3:100:40:5", rate=1.0, num_requests=50, seed=5))
    assert [r.hash_ids[0] for r in other.requests] != [r.hash_ids[0] for r in w.requests]
    r0, r1 = (r for r in w.requests if r.hash_ids[0] == w.requests[0].hash_ids[0]).__next__(), \
        next(r for r in w.requests[1:] if r.hash_ids[0] == w.requests[0].hash_ids[0])
    h0, h1 = (trace_block_hashes(r.hash_ids, 100, 140, 16) for r in (r0, r1))
    assert len(h0) == 8 and h0[:6] == h1[:6] and h0[6] != h1[6]  # 96 tokens wholly inside 100


def test_shared_prefix_hit_rate_in_the_metrics_is_the_hand_worked_one() -> None:
    """One system prompt of 1024 tokens, 70-token questions, requests 10 s apart: each after the
    first hits 64 blocks. Token hit rate 9 x 1024 / (10 x 1094), blocks 9 x 64 / (10 x 69)."""
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    w = build_workload(WorkloadSpec("shared-prefix:1:1024:70:4", rate=0.1, arrival="fixed",
                                    num_requests=10))
    on = simulate(w.requests, cm, "chunked:512").metrics
    off = simulate(w.requests, cm, "chunked:512", enable_prefix_caching=False).metrics
    assert on["prefix_cache_hit_rate"] == pytest.approx(9 * 1024 / (10 * 1094))
    assert on["prefix_cache_block_hit_rate"] == pytest.approx(9 * 64 / (10 * 69))
    assert (on["prefix_cache_hits"], on["prefix_cache_queries"]) == (9 * 1024, 10 * 1094)
    assert on["enable_prefix_caching"] is True and off["enable_prefix_caching"] is False
    assert off["prefix_cache_hits"] == off["prefix_cache_queries"] == 0
    assert on["mean_ttft_ms"] < off["mean_ttft_ms"]


def test_mooncake_hit_rate_is_positive_and_ttft_falls() -> None:
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    reqs = build_workload(WorkloadSpec("mooncake", num_requests=200)).requests
    on = simulate(reqs, cm, "chunked:512").metrics
    off = simulate(reqs, cm, "chunked:512", enable_prefix_caching=False).metrics
    assert on["prefix_cache_hit_rate"] > 0.01 and off["prefix_cache_hit_rate"] == 0
    assert on["mean_ttft_ms"] < off["mean_ttft_ms"]
    assert on["completed"] == off["completed"]


def test_flag_and_study_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    args = ["simulate", "--workload", "shared-prefix:1:1024:64:4", "--rate", "0.1", "--arrival",
            "fixed", "--num-requests", "5", "--json"]
    rows = []
    for extra in ([], ["--no-prefix-caching"]):
        assert main([*args, *extra]) == 0
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert rows[0]["prefix_cache_hits"] == 4 * 1024 and rows[1]["prefix_cache_hits"] == 0
    study = tmp_path / "s.yaml"
    study.write_text("enable_prefix_caching: false\npolicies: [chunked:512]\n")
    assert main([*args, str(study)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prefix_cache_hits"] == 0
    assert main(args[:-1]) == 0  # the compare table shows the hit rate when there are hits
    assert re.search(r"prefix cache hit rate\s+75\.3%", capsys.readouterr().out)


def test_no_policy_does_block_arithmetic() -> None:
    root = Path(__file__).resolve().parents[1] / "policies"
    for name in ("chunked", "layered", "prefill_first", "hybrid", "adaptive"):
        text = (root / f"{name}.py").read_text()
        for forbidden in ("blocks_for", "num_blocks", "decode_block_growth", "block_size",
                          "reserved", "num_free_blocks"):
            assert forbidden not in text, (name, forbidden)


def test_request_state_from_a_trace_request() -> None:
    from core.request import request_state

    r = Request(3, 1.5, 1100, 4, (9, 8, 7), 512)
    st = request_state(r, 16)
    assert st.block_table.block_hashes == trace_block_hashes((9, 8, 7), 512, 1100, 16)
    assert len(st.block_table.block_hashes) == 68 and st.num_blocks == 0
    assert request_state(Request(4, 0.0, 100, 4), 16).block_table.block_hashes == []
