"""The pricing formulas pinned against hand computation (costmodel/price.py's module docstring).

A two-layer dense model small enough to work out by hand, priced with the datasheet profile of
the "cpu" preset (no measured tables): 1e11 FLOP/s and 2e10 B/s, so its ridge point is a few
FLOPs per byte and one plan has memory-bound ops (a decode: every weight read for one token)
and another compute-bound ones (a 512-token chunk), exercising both efficiencies. Each op costs
max(FLOPs / (peak * compute_eff), bytes / (bandwidth * memory_eff)) + launches * overhead_s, the
iteration the sum plus iteration_overhead_s (and layer_overhead_s per layer with work); energy is
busy power * time * GPUs + J/FLOP * FLOPs + J/byte * HBM bytes + J/link byte * link bytes.
"""

from __future__ import annotations

import pytest

from costmodel import (
    CostModel,
    ModelSpec,
    Parallelism,
    Tile,
    decode_tile,
    default_profile,
    load_gpu,
    load_model,
)
from costmodel.coefficients import Features

REL = 1e-12  # summation order may move the last bit, nothing more

# The model: hidden 64, 4 query heads and 2 KV heads of 16, MLP 128, vocabulary 256, bf16.
H, HEADS, KV_HEADS, HD, DI, V, LAYERS = 64, 4, 2, 16, 128, 256, 2
Q, KV = HEADS * HD, KV_HEADS * HD  # 64, 32
B = 2.0  # bytes per weight, activation and KV element

TINY = ModelSpec(
    name="tiny-dense", architecture="LlamaForCausalLM", num_layers=LAYERS, hidden=H,
    num_q_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HD, vocab=V, max_context=4096,
    dense_intermediate=DI, num_experts=0, top_k=0, expert_intermediate=0,
    shared_expert_intermediate=0, sliding_window=0, sliding_layers=(False,) * LAYERS,
    weight_dtype="bfloat16", expert_dtype="bfloat16", kv_cache_dtype="bfloat16", weight_bytes=B,
    expert_weight_bytes=B, kv_bytes=B, tie_embeddings=False, attention_bias=False,
    routing_skew=1.2, rope_theta=1e4, rms_norm_eps=1e-6)

GPU = load_gpu("cpu")
PROFILE = default_profile(GPU)


def op_time(cls: str, flops: float, nbytes: float, launches: int = 1, link: bool = False) -> float:
    """One op by the roofline with the profile's efficiencies for its class."""
    p = PROFILE.ops[cls]
    bandwidth = GPU.link_bytes_per_s / 2 if link else GPU.hbm_bytes_per_s  # links: one direction
    return max(flops / (GPU.peak_flops * p.compute_eff), nbytes / (bandwidth * p.memory_eff)) \
        + launches * p.overhead_s


def bound(cls: str, flops: float, nbytes: float) -> str:
    p = PROFILE.ops[cls]
    t_c, t_m = flops / (GPU.peak_flops * p.compute_eff), nbytes / (GPU.hbm_bytes_per_s * p.memory_eff)
    return "compute" if t_c > t_m else "memory"


def energy(latency: float, flops: float, hbm: float, link: float = 0.0, gpus: int = 1) -> float:
    e = PROFILE.energy
    return (e.idle_w * gpus * latency + e.j_per_flop * flops + e.j_per_hbm_byte * hbm
            + e.j_per_link_byte * link)


def test_one_decode_is_memory_bound_and_priced_by_hand() -> None:
    ctx = 100  # cached tokens: attention reads ctx + 1 keys and values
    cost = CostModel(TINY, "cpu").price([decode_tile(0, ctx, LAYERS)])
    # Per layer, (FLOPs, HBM bytes) of each op for one token; weights are read once per layer.
    qkv = (2 * H * (Q + 2 * KV), H * (Q + 2 * KV) * B + (H + Q) * B + 2 * KV * B)  # + K, V written
    attn = (4 * HEADS * HD * (ctx + 1), 2 * KV * B * (ctx + 1) + 2 * Q * B)
    o_proj = (2 * Q * H, Q * H * B + (Q + H) * B)
    mlp = (2 * 3 * H * DI, 3 * H * DI * B + (2 * H + 3 * DI) * B)
    norms = (10 * H, 8 * H * B + 3 * DI * B)
    lm_head = (2 * H * V, H * V * B + (H + V) * B)  # once, for the one token needing logits
    embedding = (0, 2 * H * B)
    for cls, (f, b) in [("dense_gemm", qkv), ("decode_attn", attn), ("dense_gemm", o_proj),
                        ("dense_gemm", mlp), ("elementwise", norms), ("dense_gemm", lm_head)]:
        assert bound(cls, f, b) == "memory"  # the case exercises memory_eff
    per_layer = (op_time("dense_gemm", *qkv) + op_time("decode_attn", *attn)
                 + op_time("dense_gemm", *o_proj) + op_time("dense_gemm", *mlp)
                 + op_time("elementwise", *norms))
    latency = (PROFILE.iteration_overhead_s + LAYERS * per_layer + op_time("dense_gemm", *lm_head)
               + op_time("elementwise", *embedding))
    assert cost.latency_s == pytest.approx(latency, rel=REL)

    flops = LAYERS * (qkv[0] + attn[0] + o_proj[0] + mlp[0] + norms[0]) + lm_head[0]
    weights = LAYERS * (H * (Q + 2 * KV) + Q * H + 3 * H * DI) * B + H * V * B
    kv_read, kv_write = LAYERS * 2 * KV * B * (ctx + 1), LAYERS * 2 * KV * B
    hbm = LAYERS * (qkv[1] + attn[1] + o_proj[1] + mlp[1] + norms[1]) + lm_head[1] + embedding[1]
    assert cost.flops == pytest.approx(flops, rel=REL)
    assert cost.hbm_bytes.dense_weights == pytest.approx(weights, rel=REL)
    assert cost.hbm_bytes.kv_read == pytest.approx(kv_read, rel=REL)
    assert cost.hbm_bytes.kv_write == pytest.approx(kv_write, rel=REL)
    assert cost.hbm_bytes.expert_weights == 0.0
    assert cost.hbm_bytes.total == pytest.approx(hbm, rel=REL)
    assert cost.link_bytes == 0.0
    assert cost.energy_j == pytest.approx(energy(latency, flops, hbm), rel=REL)
    assert cost.detail[1] == Features(
        tm=LAYERS, nl=LAYERS, pf_pairs=0, pf_kv=0, pf_q=0, dec_kv=LAYERS * (ctx + 1), dec_q=LAYERS,
        expert_units=0, nl_pf=0, nl_dec=LAYERS, logits=1, has_logits=1, embed=1, has_embed=1)


def test_prefill_chunk_is_compute_bound_and_priced_by_hand() -> None:
    c, n = 256, 512  # 512 new tokens after 256 cached; the prompt goes on (no logits)
    cost = CostModel(TINY, "cpu").price([Tile(0, c, c + n, 0, LAYERS, c, False)])
    pairs = sum(p + 1 for p in range(c, c + n))  # query p attends to keys 0..p
    qkv = (2 * H * (Q + 2 * KV) * n, H * (Q + 2 * KV) * B + (H + Q) * B * n + 2 * KV * B * n)
    attn = (4 * HEADS * HD * pairs, 2 * KV * B * (c + n) + 2 * Q * B * n)
    o_proj = (2 * Q * H * n, Q * H * B + (Q + H) * B * n)
    mlp = (2 * 3 * H * DI * n, 3 * H * DI * B + (2 * H + 3 * DI) * B * n)
    norms = (10 * H * n, (8 * H * B + 3 * DI * B) * n)
    embedding = (0, 2 * H * B * n)
    for cls, (f, b) in [("dense_gemm", qkv), ("prefill_attn", attn), ("dense_gemm", o_proj),
                        ("dense_gemm", mlp)]:
        assert bound(cls, f, b) == "compute"  # the case exercises compute_eff
    assert bound("elementwise", *norms) == "memory"
    per_layer = (op_time("dense_gemm", *qkv) + op_time("prefill_attn", *attn)
                 + op_time("dense_gemm", *o_proj) + op_time("dense_gemm", *mlp)
                 + op_time("elementwise", *norms))
    latency = PROFILE.iteration_overhead_s + LAYERS * per_layer + op_time("elementwise", *embedding)
    assert cost.latency_s == pytest.approx(latency, rel=REL)
    assert not any(o.name == "lm_head" for o in cost.ops)  # no token needs logits: no LM head

    flops = LAYERS * (qkv[0] + attn[0] + o_proj[0] + mlp[0] + norms[0])
    hbm = LAYERS * (qkv[1] + attn[1] + o_proj[1] + mlp[1] + norms[1]) + embedding[1]
    assert cost.flops == pytest.approx(flops, rel=REL)
    assert cost.hbm_bytes.kv_read == pytest.approx(LAYERS * 2 * KV * B * (c + n), rel=REL)
    assert cost.hbm_bytes.kv_write == pytest.approx(LAYERS * 2 * KV * B * n, rel=REL)
    assert cost.hbm_bytes.total == pytest.approx(hbm, rel=REL)
    assert cost.energy_j == pytest.approx(energy(latency, flops, hbm), rel=REL)
    assert cost.detail[1] == Features(
        tm=LAYERS * n, nl=LAYERS, pf_pairs=LAYERS * pairs, pf_kv=LAYERS * (c + n), pf_q=LAYERS * n,
        dec_kv=0, dec_q=0, expert_units=0, nl_pf=LAYERS, nl_dec=0, logits=0, has_logits=0,
        embed=n, has_embed=1)


def test_host_overheads_and_busy_power_by_hand() -> None:
    """layer_overhead_s per layer that runs a tile, request_overhead_s per tile, busy_w for
    energy while kernels run: a decode of every layer and a chunk of layer 0 only."""
    e = PROFILE.energy.model_copy(update={"busy_w": 40.0})
    prof = PROFILE.model_copy(update={"layer_overhead_s": 7e-5, "request_overhead_s": 3e-5, "energy": e})
    plan = [decode_tile(0, 10, LAYERS), Tile(1, 0, 8, 0, 1, 0, False)]
    with_host = CostModel(TINY, "cpu", prof).price(plan)
    without = CostModel(TINY, "cpu").price(plan)
    host = 7e-5 * LAYERS + 3e-5 * 2  # both layers run a tile; two tiles
    assert with_host.latency_s == pytest.approx(without.latency_s + host, rel=REL)
    assert with_host.energy_j == pytest.approx(
        40.0 * with_host.latency_s + e.j_per_flop * with_host.flops
        + e.j_per_hbm_byte * with_host.hbm_bytes.total, rel=REL)


def test_tp2_decode_all_reduces_over_the_link_by_hand() -> None:
    """Two GPUs split heads and the MLP; two all-reduces per layer move the hidden state over the
    link (one direction of NVLink-style bidirectional bandwidth, allreduce efficiencies)."""
    ctx, tp = 100, 2
    cost = CostModel(TINY, "cpu", parallel=Parallelism(tp=tp)).price([decode_tile(0, ctx, LAYERS)])
    q, kv, heads, di, v = Q // tp, KV // tp, HEADS // tp, DI // tp, V // tp  # per GPU
    qkv = (2 * H * (q + 2 * kv), H * (q + 2 * kv) * B + (H + q) * B + 2 * kv * B)
    attn = (4 * heads * HD * (ctx + 1), 2 * kv * B * (ctx + 1) + 2 * q * B)
    o_proj = (2 * q * H, q * H * B + (q + H) * B)
    mlp = (2 * 3 * H * di, 3 * H * di * B + (2 * H + 3 * di) * B)
    norms = (10 * H, 8 * H * B + 3 * di * B)
    lm_head = (2 * H * v, H * v * B + (H + v) * B)
    embedding = (0, 2 * H * B)
    allreduce = 2 * 2 * (tp - 1) / tp * H * B  # two ring all-reduces of one token's hidden state
    per_layer = (op_time("dense_gemm", *qkv) + op_time("decode_attn", *attn)
                 + op_time("dense_gemm", *o_proj) + op_time("dense_gemm", *mlp)
                 + op_time("elementwise", *norms) + op_time("allreduce", 0, allreduce, 2, link=True))
    latency = (PROFILE.iteration_overhead_s + LAYERS * per_layer + op_time("dense_gemm", *lm_head)
               + op_time("elementwise", *embedding))
    assert cost.latency_s == pytest.approx(latency, rel=REL)
    flops = tp * (LAYERS * (qkv[0] + attn[0] + o_proj[0] + mlp[0] + norms[0]) + lm_head[0])
    hbm = tp * (LAYERS * (qkv[1] + attn[1] + o_proj[1] + mlp[1] + norms[1]) + lm_head[1] + embedding[1])
    link = tp * LAYERS * allreduce
    assert cost.num_gpus == tp
    assert cost.flops == pytest.approx(flops, rel=REL)
    assert cost.hbm_bytes.total == pytest.approx(hbm, rel=REL)
    assert cost.link_bytes == pytest.approx(link, rel=REL)
    assert cost.energy_j == pytest.approx(energy(latency, flops, hbm, link, gpus=tp), rel=REL)


def test_price_decodes_matches_the_plan_it_summarises() -> None:
    cm = CostModel(TINY, "cpu")
    ctxs = (5, 40, 300)
    plan = [decode_tile(i, c, LAYERS) for i, c in enumerate(ctxs)]
    by_plan, by_totals = cm.price(plan), cm.price_decodes(len(ctxs), sum(c + 1 for c in ctxs))
    assert by_totals.latency_s == by_plan.latency_s
    assert by_totals.energy_j == by_plan.energy_j
    assert by_totals.detail[1] == by_plan.detail[1]


@pytest.mark.parametrize(("model", "profile"), [("qwen3-30b-a3b", "measured"),
                                                ("gpt-oss-20b", "measured"),
                                                ("qwen3-30b-a3b", "datasheet")])
def test_a_stretch_is_priced_as_its_plans_are(model: str, profile: str) -> None:
    """price_stretch against `price` of each iteration's whole plan (decode tiles and prompt
    tiles): the same latencies to the bit, and sums over the first iterations within rounding.
    The prompt's chunks of a sliding-window model, a chunk that emits its first token, and a
    last chunk of one token (priced as a decode, counted as prefill)."""
    from costmodel import resolve_profile
    cm = CostModel(load_model(model), "h100",
                   resolve_profile("h100", None if profile == "measured" else profile),
                   Parallelism(tp=2))
    L = cm.model.num_layers
    w = cm.model.sliding_window
    contexts = [90, 400, 3000]  # the decodes', straddling gpt-oss's 128-token window
    for last in (200, 1):
        steps = [(Tile(9, t, t + 500, 0, L, t, False),) for t in (0, 500, 1000)]
        steps.append((Tile(9, 1500, 1500 + last, 0, L, 1500, True),))
        windows = [sum(min(c + j + 1, w) for c in contexts) for j in range(len(steps))] if w else []
        prices = cm.price_stretch(3, sum(contexts) + 3, windows, steps)
        plans = [[decode_tile(i, c + j, L) for i, c in enumerate(contexts)] + list(tiles)
                 for j, tiles in enumerate(steps)]
        costs = [cm.price(plan) for plan in plans]
        assert prices.latencies_s == [c.latency_s for c in costs]
        for done in (2, 4):
            ran = costs[:done]
            totals = prices.totals(done)
            assert totals["prefill_tokens"] == sum(t.t1 - t.t0 for s in steps[:done] for t in s)
            assert totals["prefill_layer_tokens"] == totals["prefill_tokens"] * L
            for key, got in (("energy_j", [c.energy_j for c in ran]), ("flops", [c.flops for c in ran]),
                             ("hbm_bytes", [c.hbm_bytes.total for c in ran]),
                             ("expert_bytes", [c.hbm_bytes.expert_weights for c in ran]),
                             ("kv_read_bytes", [c.hbm_bytes.kv_read for c in ran])):
                assert totals[key] == pytest.approx(sum(got), rel=1e-12), key


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "gpt-oss-20b"])
def test_a_steady_runs_figures_are_the_sums_of_its_steps(model: str) -> None:
    """decode_run_totals against price_decodes of every step: 5 decodes, 40 steps, each reading
    5 more tokens, and on gpt-oss's window layers 2 more (three of the five are past the
    window); the latencies summed are given."""
    from costmodel import resolve_profile
    cm = CostModel(load_model(model), "h100", resolve_profile("h100"), Parallelism(tp=2))
    num, kv, kv_window, growth, steps = 5, 9000, 3 * 128 + 40 + 60, 2, 40
    costs = [cm.price_decodes(num, kv + num * j, kv_window + growth * j) for j in range(steps)]
    latency_s = sum(c.latency_s for c in costs)
    totals = cm.decode_run_totals(num, kv, kv_window, growth, steps, latency_s)
    for key, got in (("energy_j", [c.energy_j for c in costs]), ("flops", [c.flops for c in costs]),
                     ("hbm_bytes", [c.hbm_bytes.total for c in costs]),
                     ("expert_bytes", [c.hbm_bytes.expert_weights for c in costs]),
                     ("kv_read_bytes", [c.hbm_bytes.kv_read for c in costs])):
        assert totals[key] == pytest.approx(sum(got), rel=1e-12), key
    if cm.model.sliding_window:  # the windowed reads' growth is counted
        still = cm.decode_run_totals(num, kv, kv_window, 0, steps, latency_s)
        assert totals["kv_read_bytes"] > still["kv_read_bytes"]
