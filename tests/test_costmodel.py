"""Cost model against hand-computed figures, Monte Carlo and invariants."""

from __future__ import annotations

import json

import numpy as np
import pytest

from costmodel import (
    ConfigError,
    CostModel,
    Parallelism,
    Tile,
    decode_tile,
    load_model,
    load_profile,
    parse_config,
    uniform_distinct,
)
from costmodel.experts import ExpertActivation, popularity


def op(cost, name):
    return next(o for o in cost.ops if o.name == name)


@pytest.fixture(scope="module")
def qwen():
    return load_model("qwen3-30b-a3b", routing_skew=0.0)


def test_qwen3_one_layer_prefill_by_hand(qwen):
    cm = CostModel(qwen, "h100")
    T = 512
    cost = cm.price([Tile(0, 0, T, 0, 1, 0, False)])
    h, q, kv = 2048, 32 * 128, 4 * 128
    assert op(cost, "qkv_proj").flops == 2 * T * h * (q + 2 * kv)
    assert op(cost, "o_proj").flops == 2 * T * q * h
    assert op(cost, "prefill_attn").flops == 4 * (T * (T + 1) // 2) * 32 * 128
    assert op(cost, "router").flops == 2 * T * h * 128
    assert op(cost, "experts").flops == 2 * T * 8 * 3 * h * 768
    distinct = 128 * (1 - (1 - 8 / 128) ** T)
    assert cost.experts_touched_per_layer[0] == pytest.approx(distinct)
    assert cost.experts_touched_per_layer[1:] == (0.0,) * 47
    assert cost.hbm_bytes.expert_weights == pytest.approx(distinct * 3 * h * 768 * 2)
    dense_w = (h * (q + 2 * kv) + q * h + h * 128) * 2
    assert cost.hbm_bytes.dense_weights == pytest.approx(dense_w)
    assert cost.hbm_bytes.kv_write == pytest.approx(T * 2 * kv * 2)
    assert cost.hbm_bytes.kv_read == pytest.approx(T * 2 * kv * 2)  # the chunk's own K, V
    assert not any(o.name == "lm_head" for o in cost.ops)  # no logits requested
    assert not any(o.name == "decode_attn" for o in cost.ops)
    assert cost.latency_s == pytest.approx(sum(o.time_s for o in cost.ops)
                                           + cm.profile.iteration_overhead_s)


def test_llama_one_layer_decode_by_hand():
    llama = load_model("llama-3.1-8b")
    cm = CostModel(llama, "h100")
    B, ctx = 8, 1000
    cost = cm.price([Tile(i, ctx, ctx + 1, 0, 1, ctx, False) for i in range(B)])
    h, q, kv, inter = 4096, 4096, 1024, 14336
    assert op(cost, "dense_mlp").flops == 2 * B * 3 * h * inter
    assert op(cost, "decode_attn").flops == 4 * B * (ctx + 1) * 32 * 128
    assert cost.hbm_bytes.kv_read == pytest.approx(B * (ctx + 1) * 2 * kv * 2)
    assert cost.hbm_bytes.dense_weights == pytest.approx((h * (q + 2 * kv) + q * h + 3 * h * inter) * 2)
    assert cost.hbm_bytes.expert_weights == 0
    assert cost.experts_touched_per_layer == ()
    # a decode of 8 tokens is memory-bound on an H100
    assert op(cost, "dense_mlp").bound in ("memory", "overhead")


def test_lm_head_only_for_logit_tokens(qwen):
    cm = CostModel(qwen, "h100")
    cost = cm.price([decode_tile(i, 100, 48) for i in range(4)] + [Tile(9, 0, 300, 0, 48, 0, True)])
    assert op(cost, "lm_head").flops == 2 * 5 * 2048 * 151936


def test_sliding_window_caps_attention():
    oss = load_model("gpt-oss-20b")
    cm = CostModel(oss, "h100")
    short = cm.price([decode_tile(0, 100, oss.num_layers)])
    long = cm.price([decode_tile(0, 10000, oss.num_layers)])
    # 12 full layers read the whole context; 12 sliding layers read at most 128 tokens
    kv_token = 2 * 8 * 64 * 2
    assert long.hbm_bytes.kv_read == pytest.approx(kv_token * (12 * 10001 + 12 * 128))
    assert short.hbm_bytes.kv_read == pytest.approx(kv_token * 24 * 101)
    assert oss.expert_weight_bytes == pytest.approx(4.25 / 8)


@pytest.mark.parametrize("E,k,n", [(128, 8, 1), (128, 8, 16), (128, 8, 64), (8, 2, 3), (32, 4, 10)])
def test_occupancy_matches_monte_carlo_uniform(E, k, n):
    rng = np.random.default_rng(0)
    trials = 3000
    logits = rng.standard_normal((trials, n, E))
    topk = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    touched = np.array([len(np.unique(t)) for t in topk])
    se = touched.std() / np.sqrt(trials)
    assert abs(touched.mean() - uniform_distinct(E, k, n)) < 4 * se + 1e-9
    assert ExpertActivation(E, k, 0.0).distinct(n) == pytest.approx(uniform_distinct(E, k, n))


@pytest.mark.parametrize("skew", [0.5, 0.9, 1.5, 2.0])
def test_skewed_occupancy_matches_monte_carlo(skew):
    E, k = 128, 8
    act = ExpertActivation(E, k, skew)
    p = popularity(E, skew)
    rng = np.random.default_rng(1)
    for n in (4, 32, 256):
        trials = 400
        # Gumbel top-k draws k distinct experts with probabilities proportional to p
        g = np.log(p) + rng.gumbel(size=(trials, n, E))
        topk = np.argpartition(-g, k - 1, axis=-1)[..., :k]
        counts = np.array([len(np.unique(t)) for t in topk])
        mc, se = counts.mean(), counts.std(ddof=1) / np.sqrt(trials)
        # the approximation's documented error (costmodel/experts.py: within 1% of a Gumbel
        # top-k Monte Carlo for sigma up to 2) plus 3 standard errors of the 400-trial mean
        assert abs(act.distinct(n) - mc) <= 0.01 * mc + 3 * se
        assert act.distinct(n) < uniform_distinct(E, k, n) + 1e-9  # skew lowers it


def test_popularity_shape_for_default_skew():
    from costmodel.experts import inclusion_probabilities
    from costmodel.model import DEFAULT_ROUTING_SKEW

    share = inclusion_probabilities(128, 8, DEFAULT_ROUTING_SKEW) / 8  # realised routing mass
    # published Qwen3-30B-A3B counts: top expert ~4% (we knowingly overstate it, at most 2x),
    # half the experts carry ~90% of the mass
    assert 0.04 <= share[0] <= 0.08
    # tolerance: the published "~90%" is given to one digit, so 90% +- 5 points
    assert 0.85 <= share[:64].sum() <= 0.95
    assert popularity(128, 0.0)[0] == pytest.approx(1 / 128)


def test_monotone_in_tokens_and_context(qwen):
    cm = CostModel(qwen, "h100")
    lat = [cm.price([Tile(0, 0, n, 0, 48, 0, True)]).latency_s for n in (16, 128, 1024, 4096)]
    assert lat == sorted(lat)
    lat = [cm.price([decode_tile(i, c, 48) for i in range(32)]).latency_s for c in (10, 1000, 8000)]
    assert lat == sorted(lat)
    e = [cm.price([decode_tile(i, 500, 48) for i in range(b)]).energy_j for b in (1, 8, 64)]
    assert e == sorted(e)


def test_tp2_halves_weight_bytes_per_gpu_and_adds_allreduce(qwen):
    plan = [decode_tile(i, 1000, 48) for i in range(16)]
    one = CostModel(qwen, "h100").price(plan)
    two = CostModel(qwen, "h100", parallel=Parallelism(tp=2)).price(plan)
    assert op(two, "qkv_proj").hbm_bytes < op(one, "qkv_proj").hbm_bytes
    w1 = one.hbm_bytes.dense_weights / one.num_gpus
    w2 = two.hbm_bytes.dense_weights / two.num_gpus
    # the router (hidden x experts, bf16, every layer) is replicated on each TP rank, the
    # rest split in two: w2 = w1 / 2 + router / 2
    router = qwen.num_layers * qwen.hidden * qwen.num_experts * 2
    assert w2 == pytest.approx(w1 / 2 + router / 2, rel=1e-12)
    assert two.hbm_bytes.expert_weights == pytest.approx(one.hbm_bytes.expert_weights)
    assert not any(o.name == "allreduce" for o in one.ops)
    ar = op(two, "allreduce")
    assert ar.link_bytes == pytest.approx(2 * 48 * 2 * (1 / 2) * 16 * 2048 * 2)


def test_ep_splits_experts_and_adds_alltoall(qwen):
    plan = [decode_tile(i, 1000, 48) for i in range(64)]
    ep = CostModel(qwen, "h100", parallel=Parallelism(tp=1, ep=4)).price(plan)
    base = CostModel(qwen, "h100").price(plan)
    assert op(ep, "alltoall").link_bytes > 0
    assert op(ep, "experts").hbm_bytes < op(base, "experts").hbm_bytes
    assert ep.num_gpus == 4


def test_layered_reads_experts_once_chunked_sixteen_times():
    qwen = load_model("qwen3-30b-a3b")  # default skew
    cm = CostModel(qwen, "h100")
    L, P = 48, 8192
    chunked = sum(cm.price([Tile(0, a, a + 512, 0, L, a, a + 512 == P)]).hbm_bytes.expert_weights
                  for a in range(0, P, 512))
    groups = [(g * 3, g * 3 + 3) for g in range(16)]
    layered = sum(cm.price([Tile(0, 0, P, l0, l1, 0, l1 == L)]).hbm_bytes.expert_weights
                  for l0, l1 in groups)
    # each 512-token chunk touches distinct(512) experts per layer; the whole prompt once
    # touches distinct(8192): the ratio is 16 x distinct(512) / distinct(8192), just under 16
    act = ExpertActivation(128, 8, qwen.routing_skew)
    assert chunked / layered == pytest.approx(16 * act.distinct(512) / act.distinct(8192), rel=1e-12)
    assert chunked / layered < 16


def test_bad_settings_are_one_line_errors(qwen, tmp_path):
    with pytest.raises(ConfigError, match="does not divide the 32 attention heads"):
        CostModel(qwen, "h100", parallel=Parallelism(tp=3))
    with pytest.raises(ConfigError, match="does not fit"):
        CostModel(load_model("qwen3-235b-a22b"), "h100")
    with pytest.raises(ConfigError, match="dense model"):
        CostModel(load_model("llama-3.1-8b"), "h100", parallel=Parallelism(ep=2))
    with pytest.raises(ConfigError, match="unknown GPU"):
        CostModel(qwen, "v100")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"architectures": ["FalconForCausalLM"], "hidden_size": 8}))
    with pytest.raises(ConfigError, match=r"config.json: key 'architectures': unsupported"):
        load_model(str(bad))
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 10, "num_experts": 8}
    with pytest.raises(ConfigError, match=r"m.json: missing key 'num_experts_per_tok'"):
        parse_config(cfg, source="m.json", name="m")
    with pytest.raises(ConfigError, match="unknown model"):
        load_model("no-such-model")
    with pytest.raises(ConfigError) as info:
        load_model("no-such-model")
    assert "\n" not in str(info.value)


def test_presets_match_mission_table():
    expect = {  # layers, hidden, q heads, kv heads, head dim, experts, top-k, width, vocab
        "qwen3-30b-a3b": (48, 2048, 32, 4, 128, 128, 8, 768, 151936),
        "gpt-oss-20b": (24, 2880, 64, 8, 64, 32, 4, 2880, 201088),
        "gpt-oss-120b": (36, 2880, 64, 8, 64, 128, 4, 2880, 201088),
        "qwen3-235b-a22b": (94, 4096, 64, 4, 128, 128, 8, 1536, 151936),
        "mixtral-8x7b": (32, 4096, 32, 8, 128, 8, 2, 14336, 32000),
        "qwen3-8b": (36, 4096, 32, 8, 128, 0, 0, 12288, 151936),
        "llama-3.1-8b": (32, 4096, 32, 8, 128, 0, 0, 14336, 128256),
    }
    for name, row in expect.items():
        m = load_model(name)
        width = m.expert_intermediate or m.dense_intermediate
        assert (m.num_layers, m.hidden, m.num_q_heads, m.num_kv_heads, m.head_dim, m.num_experts,
                m.top_k, width, m.vocab) == row, name
    assert load_model("qwen3-30b-a3b").total_params / 1e9 == pytest.approx(30.5, abs=0.1)
    assert load_model("gpt-oss-20b").sliding_layers[:2] == (True, False)


def test_profile_roundtrip_and_errors(tmp_path, qwen):
    from costmodel import default_profile, load_gpu, save_profile
    prof = default_profile(load_gpu("h200"))
    path = tmp_path / "p.json"
    save_profile(prof, path)
    assert load_profile(path) == prof
    raw = json.loads(path.read_text())
    raw["ops"]["dense_gemm"]["compute_eff"] = -1
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"key 'ops.dense_gemm.compute_eff'"):
        load_profile(path)
    raw["schema_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="schema_version"):
        load_profile(path)
    # a profile that doubles compute efficiency makes a compute-bound plan faster
    fast = prof.model_copy(update={"ops": {**prof.ops, "prefill_attn": prof.ops["prefill_attn"].model_copy(
        update={"compute_eff": 1.2})}})
    plan = [Tile(0, 0, 8192, 0, 48, 0, True)]
    faster = CostModel(qwen, "h200", fast).price(plan).latency_s
    assert faster < CostModel(qwen, "h200", prof).price(plan).latency_s


def test_layer_overhead_adds_per_active_layer(qwen, tmp_path):
    from costmodel import default_profile, load_gpu, save_profile
    base = default_profile(load_gpu("h200"))
    ov = 2.5e-5
    host = base.model_copy(update={"layer_overhead_s": ov})
    cm0, cm1 = CostModel(qwen, "h200", base), CostModel(qwen, "h200", host)
    decodes = [decode_tile(i, 1000, 48) for i in range(8)]
    plans = [(48, decodes), (3, [Tile(9, 0, 512, 0, 3, 0, False)]),
             # a partial tile under whole-stack decodes adds no layer: every layer already runs
             (48, decodes + [Tile(9, 0, 512, 0, 3, 0, False)])]
    for layers, plan in plans:
        with_host, without = cm1.price(plan), cm0.price(plan)
        assert with_host.latency_s - without.latency_s == pytest.approx(ov * layers, rel=1e-9)
        assert op(with_host, "host_overhead").time_s == pytest.approx(ov * layers)
        assert op(with_host, "host_overhead").bound == "overhead"
        assert with_host.latency_s == pytest.approx(sum(o.time_s for o in with_host.ops)
                                                    + host.iteration_overhead_s)
        assert not any(o.name == "host_overhead" for o in without.ops)  # 0: no row
    # two disjoint partial tiles: layers [0, 3) and [10, 12) run, 5 in all
    split = cm1.price([Tile(0, 0, 64, 0, 3, 0), Tile(1, 0, 64, 10, 12, 0)]).latency_s
    assert split - cm0.price([Tile(0, 0, 64, 0, 3, 0), Tile(1, 0, 64, 10, 12, 0)]).latency_s \
        == pytest.approx(5 * ov)
    assert cm1.price_decodes(8, 8 * 1001).latency_s == pytest.approx(cm1.price(decodes).latency_s)
    # old profiles (no key) load with 0; the key round-trips
    raw = json.loads(base.model_dump_json())
    raw.pop("layer_overhead_s")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    assert load_profile(path).layer_overhead_s == 0.0
    save_profile(host, path)
    assert load_profile(path).layer_overhead_s == ov


@pytest.mark.parametrize("key,value", [("num_key_value_heads", 0), ("head_dim", 0), ("head_dim", "x"),
                                       ("max_position_embeddings", -5), ("rope_theta", "big")])
def test_bad_optional_keys_are_errors_not_defaults(key, value):
    cfg = json.loads((__import__("costmodel").model.PRESET_DIR / "qwen3-30b-a3b.json").read_text())
    cfg[key] = value
    with pytest.raises(ConfigError, match=rf"m.json: key '{key}'"):
        parse_config(cfg, source="m.json", name="m")


@pytest.mark.parametrize("skew", [float("nan"), -0.1, 50.0])
def test_routing_skew_is_bounded(skew):
    with pytest.raises(ConfigError, match="routing-skew"):
        load_model("qwen3-30b-a3b", routing_skew=skew)


@pytest.mark.parametrize("c,n", [(0, 100), (0, 300), (50, 100), (200, 64), (1000, 1)])
def test_sliding_window_prefill_attention_by_brute_force(c, n):
    oss = load_model("gpt-oss-20b")
    cm = CostModel(oss, "h100")
    w, heads, hd = 128, 64, 64
    full = sum(p + 1 for p in range(c, c + n))  # keys each query sees without a window
    windowed = sum(min(p + 1, w) for p in range(c, c + n))
    cost = cm.price([Tile(0, c, c + n, 0, 24, c, False)])
    attn = op(cost, "decode_attn" if n == 1 else "prefill_attn")
    assert attn.flops == pytest.approx(4 * heads * hd * (12 * full + 12 * windowed))
    # K/V read: the whole context on full layers, the last w - 1 cached tokens plus the new ones
    kv_token = 2 * 8 * 64 * 2
    windowed_keys = min(c + n, w + n - 1) if n > 1 else min(c + 1, w)
    assert cost.hbm_bytes.kv_read == pytest.approx(kv_token * (12 * (c + n) + 12 * windowed_keys))
