"""Hybrid and adaptive policies: cell coverage, TBT guarantee, and the static-G comparison."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from costmodel import CostModel, Parallelism, load_model
from policies import LayeredPrefill, make_policy
from policies.adaptive import AdaptiveLayered
from policies.base import decode_tiles
from policies.hybrid import HybridPrefill
from tests.helpers import drive


@pytest.fixture(scope="module")
def qwen_cm():
    return CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))


def coverage(policy, prompts, L, cm=None):
    cells = defaultdict(list)

    def watch(state, plan):
        for t in plan:
            for layer in range(t.l0, t.l1):
                cells[(t.req_id, layer)].append((t.t0, t.t1))

    _, reqs, iters = drive(policy, prompts, num_layers=L, on_plan=watch, cost_model=cm)
    for r in reqs:
        for layer in range(L):
            spans = sorted(s for s in cells[(r.req_id, layer)] if s[1] <= r.prompt_len)
            # contiguous, non-overlapping, covering [0, P): each cell exactly once
            assert spans[0][0] == 0 and spans[-1][1] == r.prompt_len, (r.req_id, layer)
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)), (r.req_id, layer)
    return reqs, iters


def test_hybrid_covers_every_cell_once_and_chunks_long_prompts():
    L = 8
    chunks = []
    policy = HybridPrefill(budget=64)

    def watch(state, plan):
        chunks.extend((t.t1 - t.t0) * (t.l1 - t.l0) for t in plan if t.t1 - t.t0 > 1)

    rng = random.Random(0)
    prompts = [(rng.randrange(0, 50), rng.randrange(1, 2000), 3) for _ in range(20)]
    coverage(policy, prompts, L)
    drive(HybridPrefill(budget=64), [(0, 5000, 2)], num_layers=L, on_plan=watch)
    assert max(chunks) <= 64 * L  # every iteration within one chunk's token-layers
    assert len(chunks) > L  # the 5000-token prompt needed more passes than there are layers


def test_hybrid_equals_layered_when_prompts_fit():
    L = 8
    a = []
    b = []
    drive(HybridPrefill(512), [(0, 2048, 2)], num_layers=L, on_plan=lambda s, p: a.append(p))
    drive(LayeredPrefill(), [(0, 2048, 2)], num_layers=L, on_plan=lambda s, p: b.append(p))
    assert a == b


def test_adaptive_covers_every_cell_once(qwen_cm):
    rng = random.Random(1)
    prompts = [(rng.randrange(0, 100), rng.randrange(100, 9000), rng.randrange(2, 30)) for _ in range(15)]
    reqs, _ = coverage(AdaptiveLayered(60.0), prompts, 48, qwen_cm)
    assert all(r.is_finished for r in reqs)


@pytest.mark.parametrize("tbt_ms", [30.0, 60.0, 150.0])
def test_adaptive_never_exceeds_target_when_a_legal_plan_exists(qwen_cm, tbt_ms):
    over = []
    checked = []

    def watch(state, plan):
        decodes = tuple(decode_tiles(state))
        # The target protects running decodes; with none running there is no gap to protect.
        if decodes and qwen_cm.price(decodes).latency_s <= tbt_ms / 1e3 and any(
                t.t1 - t.t0 > 1 for t in plan):
            lat = qwen_cm.price(plan).latency_s
            checked.append(lat)
            if lat > tbt_ms / 1e3 * (1 + 1e-12):
                over.append(lat)

    rng = random.Random(2)
    prompts = [(rng.randrange(0, 200), rng.randrange(500, 16000), rng.randrange(5, 60)) for _ in range(25)]
    drive(AdaptiveLayered(tbt_ms), prompts, num_layers=48, on_plan=watch, cost_model=qwen_cm)
    assert checked and not over


def test_adaptive_meets_target_wherever_static_g_does(qwen_cm):
    """Replay static layered's states: wherever its plan met the target, adaptive's does too."""
    tbt = 0.05
    adaptive = AdaptiveLayered(tbt * 1e3)
    static = LayeredPrefill()
    misses = []

    def watch(state, plan):
        if state.decodes and qwen_cm.price(plan).latency_s <= tbt:
            if qwen_cm.price(adaptive.schedule(state)).latency_s > tbt:
                misses.append(state.now_s)

    rng = random.Random(3)
    prompts = [(rng.randrange(0, 100), rng.randrange(200, 12000), rng.randrange(2, 40)) for _ in range(20)]
    drive(static, prompts, num_layers=48, on_plan=watch, cost_model=qwen_cm)
    assert not misses


def test_registry_builds_the_new_policies():
    assert make_policy("hybrid").name == "hybrid:512"
    assert make_policy("adaptive:80").name == "adaptive:80"


def test_adaptive_without_decodes_runs_the_whole_prompt(qwen_cm):
    plans = []
    drive(AdaptiveLayered(10.0), [(0, 9000, 2)], num_layers=48, cost_model=qwen_cm,
          on_plan=lambda s, p: plans.append(p))
    assert [(t.t0, t.t1, t.l0, t.l1) for t in plans[0]] == [(0, 9000, 0, 48)]
