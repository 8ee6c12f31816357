"""The engine computes the unscheduled forward pass whatever the plan, and serves a trace."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from core.records import ITERATION_COLUMNS, REQUEST_COLUMNS  # noqa: E402
from costmodel import CostModel, Tile, default_profile, load_gpu, load_model  # noqa: E402
from engine.executor import Engine, EngineError  # noqa: E402
from engine.reference import reference_forward  # noqa: E402
from engine.serve import serve  # noqa: E402
from traces import Request  # noqa: E402

ATOL = 1e-4  # fp32: different summation orders (SDPA, grouped GEMM, batching) differ ~1e-6


@pytest.fixture(scope="module")
def spec():
    return load_model("tiny-moe")


@pytest.fixture(scope="module")
def engine(spec):
    return Engine(spec, "cpu", seed=0, kv_tokens=8192)


def _close(a, b) -> float:
    return float((a - b).abs().max())


def test_layered_chunked_and_decode_match_full_forward(engine, spec):
    L, P = spec.num_layers, 150
    ids = engine.add_request(1, P)
    for rid in (2, 3):
        engine.add_request(rid, P)
        engine.tokens[rid] = list(ids)
    ref = reference_forward(engine.w, ids)[-1]  # [V]
    # Layered: two layer groups, the hidden states kept between the two iterations.
    engine.execute((Tile(1, 0, P, 0, L // 2, 0),))
    assert engine.pieces[1][0].layer == L // 2
    out = engine.execute((Tile(1, 0, P, L // 2, L, 0, True),), return_logits=True)
    assert _close(out.logits[1], ref) < ATOL
    assert not engine.pieces[1]  # the frontier buffer is dropped at the last layer
    # Chunked: two chunks through every layer, the second attending to the first's KV.
    engine.execute((Tile(2, 0, 90, 0, L, 0),))
    out = engine.execute((Tile(2, 90, P, 0, L, 90, True),), return_logits=True)
    assert _close(out.logits[2], ref) < ATOL
    # A hybrid rectangle mixed with a decode of request 1 in the same plan.
    engine.execute((Tile(3, 0, 90, 0, L, 0), Tile(3, 90, P, 0, 1, 90)))
    out = engine.execute((Tile(3, 90, P, 1, L, 90, True), Tile(1, P, P + 1, 0, L, P, True)),
                         return_logits=True)
    assert _close(out.logits[3], ref) < ATOL
    ref_dec = reference_forward(engine.w, engine.tokens[1][:P + 1])[-1]
    assert _close(out.logits[1], ref_dec) < ATOL
    assert out.tokens[1] == int(torch.argmax(ref_dec))
    assert len(out.experts_touched) == L and all(0 < e <= spec.num_experts for e in out.experts_touched)
    for rid in (1, 2, 3):
        engine.release(rid)


def test_sliding_window_shared_expert_and_loop_path(spec):
    """Window masks, GQA decode batching with uneven contexts, shared experts, the loop path."""
    s = spec.with_overrides(architecture="Qwen2MoeForCausalLM", sliding_window=40,
                            sliding_layers=(True, False, True, False), shared_expert_intermediate=128,
                            attention_bias=True)
    eng = Engine(s, "cpu", seed=3, kv_tokens=4096, experts="loop")
    assert eng.expert_impl == "loop"
    L = s.num_layers
    lens = {1: 70, 2: 33, 3: 121}
    for rid, n in lens.items():
        eng.add_request(rid, n)
        eng.execute((Tile(rid, 0, n, 0, L, 0, True),))
    plan = tuple(Tile(rid, n + 1 - 1, n + 1, 0, L, n, True) for rid, n in lens.items())
    out = eng.execute(plan, return_logits=True)
    for rid, n in lens.items():
        ref = reference_forward(eng.w, eng.tokens[rid][:n + 1])[-1]
        assert _close(out.logits[rid], ref) < ATOL
    # A window-crossing chunk with cached context.
    eng.add_request(4, 100)
    eng.execute((Tile(4, 0, 55, 0, L, 0),))
    out = eng.execute((Tile(4, 55, 100, 0, L, 55, True),), return_logits=True)
    assert _close(out.logits[4], reference_forward(eng.w, eng.tokens[4][:100])[-1]) < ATOL


def test_grouped_and_loop_experts_agree(engine, spec):
    eng_loop = Engine(spec, "cpu", seed=0, kv_tokens=2048, experts="loop", weights=engine.w)
    L = spec.num_layers
    for e in (engine, eng_loop):
        e.add_request(7, 40)
        e.tokens[7] = list(range(40))
    a = engine.execute((Tile(7, 0, 40, 0, L, 0, True),), return_logits=True)
    b = eng_loop.execute((Tile(7, 0, 40, 0, L, 0, True),), return_logits=True)
    assert _close(a.logits[7], b.logits[7]) < ATOL
    assert a.experts_touched == b.experts_touched
    engine.release(7)


def test_plan_errors(engine, spec):
    with pytest.raises(EngineError, match="does not know"):
        engine.execute((Tile(99, 0, 4, 0, spec.num_layers, 0),))
    engine.add_request(8, 16)
    with pytest.raises(EngineError, match="no hidden state"):
        engine.execute((Tile(8, 0, 16, 2, spec.num_layers, 0),))
    engine.release(8)


@pytest.mark.parametrize("policy", ["chunked:64", "layered"])
def test_serve_finishes_every_request(engine, spec, policy):
    cm = CostModel(spec, "cpu", default_profile(load_gpu("cpu")))
    reqs = [Request(i, 0.01 * i, 100 + 30 * i, 3 + i) for i in range(4)]
    res = serve(engine, reqs, policy, cm)
    assert res.metrics["completed"] == 4 and res.metrics["unfinished"] == 0
    assert list(res.requests.columns) == list(REQUEST_COLUMNS)
    assert set(ITERATION_COLUMNS) <= set(res.iterations.columns)
    assert res.requests["finished"].all()
    assert (res.requests["output_tokens"] == [3, 4, 5, 6]).all()
    it = res.iterations
    assert int(it["decode_tokens"].sum()) + len(reqs) == sum(r.output_tokens for r in reqs)
    assert (it["expert_bytes"] > 0).all() and it["energy_j"].isna().all()
    assert res.metrics["energy_j"] is None  # the CPU measures no energy
    assert not engine.kv.pages and not engine.tokens  # everything released
    assert engine.kv.free_pages == engine.kv.num_pages


def test_serve_preempts_and_recomputes_under_tight_kv(engine, spec):
    """With KV for ~2 requests, decodes preempt the newest request (vLLM's recompute); the
    engine frees its pages, keeps its tokens and reruns its prefill; everything finishes."""
    cm = CostModel(spec, "cpu", default_profile(load_gpu("cpu")))
    blocks = 36  # of 16 tokens: room for about two of the requests below at full length
    reserve = cm.hw.hbm_bytes - cm.weight_bytes_per_gpu - blocks * 16 * cm.kv_bytes_per_token_per_gpu
    reqs = [Request(i, 0.0, 200, 90) for i in range(3)]
    res = serve(engine, reqs, "chunked:256", cm, gpu_memory_utilization=1.0,
                activation_reserve_bytes=reserve)
    assert res.metrics["completed"] == 3
    assert res.metrics["preemptions"] > 0
    assert not engine.kv.pages and not engine.tokens


def test_engine_books_a_prompts_last_token_run_alone_as_prefill(engine, spec):
    """chunked:64 on a 65-token prompt runs its last prompt token alone (priced as a decode):
    the engine's iteration rows book it as prefill, as the simulator's do."""
    cm = CostModel(spec, "cpu", default_profile(load_gpu("cpu")))
    res = serve(engine, [Request(0, 0.0, 65, 4)], "chunked:64", cm)
    it = res.iterations
    assert it["prefill_tokens"].tolist()[:2] == [64, 1]
    assert int(it["prefill_tokens"].sum()) == 65 and int(it["decode_tokens"].sum()) == 3
    assert int(it["prefill_layer_tokens"].sum()) == 65 * spec.num_layers
