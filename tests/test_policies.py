"""Policies without SimPy: legality, budgets, layer coverage, stalls, user policies."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from costmodel import ConfigError, Tile
from policies import ChunkedPrefill, LayeredPrefill, PrefillFirst, group_bounds, make_policy, num_groups
from policies.state import PlanError, ReplicaState, RequestState
from tests.helpers import drive


def random_prompts(seed: int, n: int = 40) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(0, 300), rng.randrange(1, 3000), rng.randrange(1, 40)) for _ in range(n)]


@pytest.mark.parametrize("spec", ["chunked:512", "chunked:64", "layered", "layered:4", "prefill-first"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_request_finishes_with_its_tokens(spec, seed):
    state, reqs, _ = drive(make_policy(spec), random_prompts(seed))
    assert all(r.is_finished for r in reqs)
    assert [r.num_output_tokens for r in reqs] == [r.output_len for r in reqs]
    assert state.num_free_blocks == state.num_total_blocks


@pytest.mark.parametrize("spec", ["chunked:512", "layered", "layered:8"])
def test_stall_free_policies_never_skip_a_decode(spec):
    skipped = []

    def watch(state, plan):
        ids = {t.req_id for t in plan}
        skipped.extend(r.req_id for r in state.decodes if r.req_id not in ids)

    drive(make_policy(spec), random_prompts(3), on_plan=watch)
    assert skipped == []


def test_chunked_never_exceeds_budget():
    sizes = []
    drive(ChunkedPrefill(256), random_prompts(4),
          on_plan=lambda s, p: sizes.append(sum(t.t1 - t.t0 for t in p)))
    assert max(sizes) <= 256
    assert max(sizes) == 256  # and it does fill it under load


def test_layered_prefills_every_layer_once():
    L = 12
    cells: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)

    def watch(state, plan):
        for t in plan:
            for layer in range(t.l0, t.l1):
                cells[(t.req_id, layer)].append((t.t0, t.t1))

    _, reqs, _ = drive(LayeredPrefill(), random_prompts(5), num_layers=L, on_plan=watch)
    for r in reqs:
        for layer in range(L):
            spans = sorted(cells[(r.req_id, layer)])
            prefill = [s for s in spans if s[1] <= r.prompt_len]
            assert prefill == [(0, r.prompt_len)], (r.req_id, layer, prefill)  # whole prompt, once


def test_layered_finishes_in_g_iterations_unloaded():
    for P in (100, 512, 513, 3000, 8192, 40000):
        L = 48
        G = num_groups(P, L)
        assert G == min(L, max(1, -(-P // 512)))
        _, reqs, iters = drive(LayeredPrefill(), [(0, P, 1)], num_layers=L)
        assert iters == G
        bounds = group_bounds(L, G)
        assert bounds[0][0] == 0 and bounds[-1][1] == L
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_layered_power_of_two_buckets():
    prompts = (100, 600, 1500, 3000, 9000, 100000)
    assert [num_groups(P, 48, max_groups=16) for P in prompts] == [1, 2, 4, 8, 16, 16]


def test_short_prompts_share_a_group_pass():
    seen = []
    drive(LayeredPrefill(), [(0, 100, 1), (0, 200, 1), (0, 150, 1)], on_plan=lambda s, p: seen.append(len(p)))
    assert seen[0] == 3  # one pass carries all three


def test_prefill_first_stalls_decodes():
    stalls = []

    def watch(state, plan):
        ids = {t.req_id for t in plan}
        if state.decodes and any(r.req_id not in ids for r in state.decodes):
            stalls.append(len(plan))

    drive(PrefillFirst(), [(0, 100, 50), (5, 3000, 5)], on_plan=watch)
    assert stalls  # the second prompt ran alone while the first was decoding


def _state_with(req: RequestState, L: int = 4) -> ReplicaState:
    st = ReplicaState(num_layers=L, num_total_blocks=1000)
    st.waiting.append(req)
    return st


@pytest.mark.parametrize("tile,rule", [
    (Tile(0, 0, 200, 0, 4, 0, True), "outside the request"),
    (Tile(0, 0, 50, 0, 5, 0, False), "outside"),
    (Tile(0, 10, 50, 0, 4, 10, False), "does not start where those layers stand"),
    (Tile(0, 0, 50, 1, 4, 0, False), "before layer 0 has computed them"),
    (Tile(0, 0, 50, 0, 4, 3, False), "num_cached must equal t0"),
    (Tile(7, 0, 50, 0, 4, 0, False), "neither waiting nor running"),
])
def test_illegal_plans_name_the_rule(tile, rule):
    st = _state_with(RequestState(0, 0.0, 100, 5))
    with pytest.raises(PlanError, match=rule):
        st.check((tile,), stall_free=False)


def test_skipped_decode_under_stall_free_claim():
    st = _state_with(RequestState(0, 0.0, 10, 5))
    st.apply((Tile(0, 0, 10, 0, 4, 0, True),), 1.0)
    assert st.decodes
    with pytest.raises(PlanError, match="skipped the decode of running request 0"):
        st.check((), stall_free=True)
    st.check((), stall_free=False)


def test_user_policy_from_file_and_interface_errors(tmp_path):
    policy = make_policy("examples/shortest_prompt_first.py:ShortestPromptFirst")
    assert policy.name == "spf-chunked:512"
    _, reqs, _ = drive(policy, random_prompts(6))
    assert all(r.is_finished for r in reqs)
    bad = tmp_path / "bad.py"
    bad.write_text("class NoSchedule:\n    name = 'x'\n    stall_free = True\n"
                   "class NoFlag:\n    name = 'x'\n    def schedule(self, state):\n        return ()\n")
    with pytest.raises(ConfigError, match="needs a method schedule"):
        make_policy(f"{bad}:NoSchedule")
    with pytest.raises(ConfigError, match="'stall_free'"):
        make_policy(f"{bad}:NoFlag")
    with pytest.raises(ConfigError, match="no class 'Missing'"):
        make_policy(f"{bad}:Missing")
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("fifo")
    with pytest.raises(ConfigError, match="must be an integer"):
        make_policy("chunked:big")
