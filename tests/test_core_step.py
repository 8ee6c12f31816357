"""core/step.py is the one serving step: the simulator and the engine make the same plans, emit
the same tokens in the same order, preempt the same victims and reject the same requests; the
fast-forward's closed form equals the single steps it replaces."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import core.step
from core.records import ITERATION_COLUMNS, Recorder
from core.request import RequestState
from core.state import ReplicaState
from core.step import apply_steady, commit, steady_steps
from costmodel import CostModel, Tile, default_profile, load_gpu, load_model
from policies.base import decode_tiles, prompt_tile
from sim.cluster import simulate
from traces import Request

# ---- the closed form of steady decoding -----------------------------------------------------


def _decoding(prompts: list[int], outputs: list[int], num_blocks: int) -> ReplicaState:
    """A state whose requests have all finished their prompts (one token each) at t = 1.0."""
    state = ReplicaState(num_layers=4, num_total_blocks=num_blocks, block_size=16)
    state.waiting = [RequestState(i, 0.0, p, o)
                     for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))]
    commit(state, tuple(Tile(r.req_id, 0, r.num_prompt_tokens, 0, 4, 0, True) for r in state.waiting),
           1.0)
    return state


def _end(j: int, start: float, l0: float, slope: float) -> float:
    """When decode step j (0-based) ends: the simulator's arithmetic series."""
    return start + (j + 1) * l0 + slope * j * (j + 1) / 2


def _snapshot(state: ReplicaState) -> list[tuple[object, ...]]:
    return [(r.req_id, r.num_output_tokens, r.num_computed_tokens, r.num_blocks, r.last_token_s,
             r.finish_s) for r in sorted(state.running, key=lambda r: r.req_id)]


@pytest.mark.parametrize("prompts,outputs,num_blocks,interrupt", [
    ([40, 70, 16], [30, 30, 30], 1000, 0),  # nobody finishes within it
    ([40, 70, 16], [30, 9, 30], 1000, 0),  # request 1 finishes at the stretch's last step
    ([31, 100], [200, 200], 16, 0),  # the free KV blocks end the stretch
    ([40, 70, 16], [30, 30, 30], 1000, 5),  # an arrival cuts it short after 5 steps
])
def test_apply_steady_equals_that_many_single_commits(prompts, outputs, num_blocks, interrupt):
    closed, single = _decoding(prompts, outputs, num_blocks), _decoding(prompts, outputs, num_blocks)
    k = interrupt or steady_steps(closed)
    assert k >= 2
    start, l0, slope = 1.0, 0.013, 3.7e-6
    finished = apply_steady(closed, k, _end(0, start, l0, slope), l0, slope, _end(k - 1, start, l0, slope))
    single_finished = []
    for j in range(k):
        plan = tuple(decode_tiles(single))
        assert len(plan) == len(single.running)  # still one identical decode batch
        single_finished += commit(single, plan, _end(j, start, l0, slope)).finished
    assert [r.req_id for r in finished] == [r.req_id for r in single_finished]
    assert _snapshot(closed) == _snapshot(single)
    assert closed.num_free_blocks == single.num_free_blocks
    for a, b in zip(sorted(closed.running + finished, key=lambda r: r.req_id),
                    sorted(single.running + single_finished, key=lambda r: r.req_id), strict=True):
        assert (a.num_output_tokens, a.finish_s, a.num_blocks) == (
            b.num_output_tokens, b.finish_s, b.num_blocks)
        assert len(a.itl_s) == len(b.itl_s) == a.num_output_tokens - 1
        assert max(abs(x - y) for x, y in zip(a.itl_s, b.itl_s, strict=True)) < 1e-12
    if outputs[1] == 9:
        assert [r.req_id for r in finished] == [1] and finished[0].finish_s == _end(k - 1, start, l0, slope)
    if num_blocks == 16:
        assert k < min(outputs) - 1 and closed.decode_growth(closed.running) > closed.num_free_blocks


# ---- both executors on one trace ------------------------------------------------------------
@pytest.fixture(scope="module")
def spec():
    return load_model("tiny-moe")


@pytest.fixture(scope="module")
def engine(spec):
    pytest.importorskip("torch")
    from engine.executor import Engine

    return Engine(spec, "cpu", seed=0, kv_tokens=8192)


@pytest.fixture(scope="module")
def cm(spec):
    return CostModel(spec, "cpu", default_profile(load_gpu("cpu")))


def _tight(cm: CostModel, blocks: int) -> dict[str, float]:
    """serve/simulate arguments that leave exactly `blocks` KV blocks of 16 tokens."""
    reserve = cm.hw.hbm_bytes - cm.weight_bytes_per_gpu - blocks * 16 * cm.kv_bytes_per_token_per_gpu
    return {"gpu_memory_utilization": 1.0, "activation_reserve_bytes": reserve}


class _Steps:
    """Every committed plan, the tokens it emitted (request, index among its outputs) and every
    preemption, whichever executor commits them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.plans: list[tuple[Tile, ...]] = []
        self.tokens: list[tuple[int, int]] = []
        self.victims: list[int] = []
        self.for_decodes: list[int] = []  # victims of decodes short of KV (the rest: empty plans)

        def spy_commit(state, plan, end_s):  # type: ignore[no-untyped-def]
            done = core.step.commit(state, plan, end_s)
            self.plans.append(tuple(plan))
            self.tokens += [(r.req_id, len(r.itl_s)) for r in done.emitted]  # before itl_s is recorded
            return done

        preempted, for_decodes = Recorder.preempted, ReplicaState.preempt_for_decodes

        def spy_preempted(rec, req):  # type: ignore[no-untyped-def]
            self.victims.append(req.req_id)
            preempted(rec, req)

        def spy_for_decodes(state):  # type: ignore[no-untyped-def]
            victims = for_decodes(state)
            self.for_decodes += [v.req_id for v in victims]
            return victims

        monkeypatch.setattr("sim.replica.commit", spy_commit)
        monkeypatch.setattr("engine.serve.commit", spy_commit)
        monkeypatch.setattr(Recorder, "preempted", spy_preempted)
        monkeypatch.setattr(ReplicaState, "preempt_for_decodes", spy_for_decodes)

    def take(self) -> tuple[list[tuple[Tile, ...]], list[tuple[int, int]], list[int], list[int]]:
        out = (self.plans, self.tokens, self.victims, self.for_decodes)
        self.plans, self.tokens, self.victims, self.for_decodes = [], [], [], []
        return out


def _both(monkeypatch, engine, cm, requests, policy, **kw):  # type: ignore[no-untyped-def]
    """(simulator's, engine's) results and steps; the simulator unforwarded, so that every one
    of its iterations is a commit as the engine's are."""
    from engine.serve import serve

    steps = _Steps(monkeypatch)
    sim = simulate(requests, cm, policy, fast_forward=False, **kw)
    sim_steps = steps.take()
    tokens: list[tuple[int, int, int, float]] = []
    eng = serve(engine, requests, policy() if callable(policy) else policy, cm, token_log=tokens, **kw)
    eng_steps = steps.take()
    assert [rid for rid, *_ in tokens] == [rid for rid, _ in eng_steps[1]]  # the logged order
    assert not engine.kv.pages and not engine.tokens  # everything released
    return sim, eng, sim_steps, eng_steps


@pytest.mark.parametrize("policy", ["chunked:64", "layered"])
def test_one_trace_makes_the_same_plans_and_tokens_in_both_executors(monkeypatch, engine, cm, policy):
    requests = [Request(i, 0.0, 100 + 30 * i, 3 + i) for i in range(4)]  # all at t=0: no timing
    sim, eng, (sim_plans, sim_tokens, *_), (eng_plans, eng_tokens, *_) = _both(
        monkeypatch, engine, cm, requests, policy)
    assert sim_plans == eng_plans and len(sim_plans) > 4
    assert sim_tokens == eng_tokens
    assert sorted(sim_tokens) == [(r.req_id, i) for r in requests for i in range(r.output_tokens)]
    for res in (sim, eng):
        assert res.metrics["completed"] == 4


class _EveryPrompt:
    """Advances every prompt by 64 tokens per iteration while its blocks fit, beside the
    decodes; so two prompts can fill the KV part-way with nothing decoding."""

    name = "every-prompt"
    stall_free = True
    steady_decode = False

    def schedule(self, state: ReplicaState) -> tuple[Tile, ...]:
        L = state.num_layers
        tiles = decode_tiles(state)
        admission = state.admission()
        for req in [*state.running, *state.waiting]:
            if req.is_prefill_done:
                continue
            t1 = min(req.num_prompt_tokens, req.num_computed_tokens + 64)
            if admission.try_admit(req, t1):
                tiles.append(prompt_tile(req, t1, 0, L, L))
        return tuple(tiles)


def test_part_way_prompts_that_fill_the_kv_preempt_the_same_victim_in_both(monkeypatch, engine, cm):
    """20 blocks; two 200-token prompts reach 128 tokens each, the first takes the last free
    blocks to 192, then neither can grow and nothing decodes: the newest is recomputed."""
    requests = [Request(0, 0.0, 200, 4), Request(1, 0.0, 200, 4)]
    sim, eng, sim_steps, eng_steps = _both(monkeypatch, engine, cm, requests, _EveryPrompt,
                                           **_tight(cm, 20))
    assert sim_steps == eng_steps
    _, _, victims, for_decodes = sim_steps
    assert victims == [1] and for_decodes == []
    for res in (sim, eng):
        assert res.metrics["completed"] == 2 and res.metrics["preemptions"] == 1


def test_decodes_short_of_kv_preempt_the_same_victims_in_both(monkeypatch, engine, cm):
    requests = [Request(i, 0.0, 48, 40) for i in range(3)]  # 6 blocks each at the end, 12 in all
    sim, eng, sim_steps, eng_steps = _both(monkeypatch, engine, cm, requests, "chunked:256",
                                           **_tight(cm, 12))
    assert sim_steps == eng_steps
    _, _, victims, for_decodes = sim_steps
    assert victims and victims == for_decodes  # every one of them for a decode's next block
    for res in (sim, eng):
        assert res.metrics["completed"] == 3 and res.metrics["preemptions"] == len(victims)


def test_requests_that_never_fit_are_rejected_alike_in_both(monkeypatch, engine, cm, spec):
    ctx = spec.max_context
    requests = [Request(0, 0.0, 60, 5), Request(1, 0.0, ctx + 1, 5), Request(2, 0.0, ctx - 2, 5),
                Request(3, 0.0, 150, 100), Request(4, 0.0, 90, 6)]
    sim, eng, sim_steps, eng_steps = _both(monkeypatch, engine, cm, requests, "chunked:64",
                                           **_tight(cm, 12))
    assert sim_steps[:2] == eng_steps[:2]
    reasons = {1: "prompt > context", 2: "prompt + output > context", 3: "KV cache too small"}
    for res in (sim, eng):
        assert res.rejections == reasons
        assert {k: res.metrics[k] for k in ("rejected_prompt_over_context",
                                            "rejected_prompt_output_over_context",
                                            "rejected_over_kv_cache")} == dict.fromkeys(
            ("rejected_prompt_over_context", "rejected_prompt_output_over_context",
             "rejected_over_kv_cache"), 1)
        assert res.metrics["completed"] == 2 and res.metrics["num_requests"] == 5
        assert sorted(res.requests.loc[~res.requests["finished"], "req_id"]) == [1, 2, 3]


def test_core_imports_neither_torch_nor_simpy():
    code = ("import sys, core, core.step, core.admission, core.result, core.metrics; "
            "assert not {'torch', 'simpy'} & set(sys.modules), 'torch or simpy imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_engine_imports_no_simpy():
    pytest.importorskip("torch")
    code = "import sys, engine.serve; assert 'simpy' not in sys.modules, 'simpy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_iteration_rows_are_given_by_column_name():
    params = list(inspect.signature(Recorder.iteration_row).parameters)[1:]
    assert params == list(ITERATION_COLUMNS)


@pytest.mark.parametrize("part_way_newest", [False, True])
def test_decodes_short_of_blocks_preempt_the_newest_until_the_rest_fit(part_way_newest: bool) -> None:
    """Four or five 32-token prompts done, each decode's next token starting a third block, and
    no block free. Preempting the newest frees its 2 blocks and removes its 1 block of need:
    need 5 (free 0), 4 (2), 3 (4): two victims. With a 48-token part-way prompt newest
    instead, its 3 blocks go back but no need with them: need 4 (free 0), 4 (3), 3 (5)."""
    n = 4 if part_way_newest else 5
    state = ReplicaState(num_layers=4, num_total_blocks=2 * n + 3 * part_way_newest, block_size=16)
    state.waiting = [RequestState(i, 0.0, 32, 8) for i in range(n)]
    tiles = [Tile(i, 0, 32, 0, 4, 0, True) for i in range(n)]
    if part_way_newest:
        state.waiting.append(RequestState(n, 0.0, 100, 8))
        tiles.append(Tile(n, 0, 48, 0, 4, 0, False))
    commit(state, tuple(tiles), 1.0)
    assert state.num_free_blocks == 0 and len(state.decodes) == n
    victims = state.preempt_for_decodes()
    assert [v.req_id for v in victims] == [4, 3]
    assert state.decode_growth(state.decodes) <= state.num_free_blocks
    assert [r.req_id for r in state.running] == [0, 1, 2] and state.num_free_blocks == (
        5 if part_way_newest else 4)


@pytest.mark.parametrize("policy_name", ["chunked:64", "layered:4"])
@pytest.mark.parametrize("seed", range(3))
def test_apply_with_decodes_given_as_a_list_equals_apply_of_their_tiles(
        policy_name: str, seed: int) -> None:
    """The fast-forward applies a plan of every decode and prompt tiles without the decodes'
    tiles (apply's `decodes`): the state after it, pickled, equals the state after `apply` of
    the whole plan, at every iteration of a run with shared prefixes and few KV blocks (hits,
    evictions, first tokens, finishes, preemptions)."""
    import copy
    import pickle
    import random

    from core.hashes import shared_prefix_block_hashes
    from policies import make_policy
    rng = random.Random(seed)
    policy = make_policy(policy_name)
    state = ReplicaState(num_layers=8, num_total_blocks=64, block_size=16,
                         hidden_blocks_per_token=0.05)
    arrivals = sorted((rng.randrange(30), rng.choice([20, 90, 300]), rng.choice([1, 2, 150]))
                      for _ in range(24))
    compared = 0
    for it in range(400):
        while arrivals and arrivals[0][0] <= it:
            _, prompt, output = arrivals.pop(0)
            rid = 100 - len(arrivals)
            state.enqueue(RequestState(rid, float(it), prompt, output, shared_prefix_block_hashes(
                prompt, 16, rid % 2, 64, rid)))
        if not state.running and not state.waiting:
            continue
        state.preempt_for_decodes()
        state.match_waiting()
        plan = policy.schedule(state)
        decodes = state.decodes
        n = len(decodes)
        if plan[n:] and [t.req_id for t in plan[:n]] == [r.req_id for r in decodes]:
            other = copy.deepcopy(state)
            other.apply(plan[n:], it + 1.0, decodes=other.decodes)
            state.apply(plan, it + 1.0)
            assert pickle.dumps(state) == pickle.dumps(other), it
            compared += 1
        else:
            state.apply(plan, it + 1.0)
    assert compared > 15 and not arrivals and not state.running
    assert state.num_preemptions and state.pool.stats().num_evictions
