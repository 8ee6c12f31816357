"""Power fit: shape counts by hand, known coefficients recovered, and the H200 tables' fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrate.power_fit import decode_work, design, fit_energy, fit_power, gemm_work, moe_work, prefill_work

GPU_DATA = Path(__file__).parents[1].parent / "shared" / "gpu-data"
IDLE_W, J_PER_FLOP, J_PER_HBM_BYTE = 150.0, 4e-13, 6e-11


def test_work_counts_by_hand() -> None:
    g = gemm_work(pd.DataFrame({"gemm_dtype": ["bfloat16", "fp8"], "m": [1024, 1024], "n": [1024] * 2,
                                "k": [1024] * 2}))
    assert g["flops"].tolist() == [2 * 1024**3] * 2
    assert g["hbm_bytes"].tolist() == [6 * 2**20, 4 * 2**20]  # A and B at 2 or 1 byte, C at 2
    m = moe_work(pd.DataFrame({"moe_dtype": ["bfloat16"] * 2, "num_tokens": [1] * 2, "hidden_size": [4] * 2,
                               "inter_size": [6] * 2, "topk": [2] * 2, "num_experts": [8] * 2,
                               "moe_tp_size": [2, 1], "moe_ep_size": [1, 2]}))
    # tp 2: inter 6 -> 3, one token touches its 2 experts; ep 2: a rank holds 4 of 8 experts, so
    # it expects half the token's FLOPs and 4 * (1 - 6/8) = 1 expert of 3 * 4 * 6 weights
    assert m["flops"].tolist() == [2 * 1 * 2 * 3 * 4 * 3, 2 * 1 * 2 * 3 * 4 * 6 / 2]
    assert m["hbm_bytes"].tolist() == pytest.approx([2 * 3 * 4 * 3 * 2, 1 * 3 * 4 * 6 * 2])
    attn = {"batch_size": [1, 1], "isl": [4, 4], "num_heads": [1, 1], "num_key_value_heads": [1, 1],
            "head_dim": [1, 1], "attn_dtype": ["bfloat16"] * 2, "kv_cache_dtype": ["fp8"] * 2,
            "window_size": [0, 2]}
    p = prefill_work(pd.DataFrame(attn))
    assert p["flops"].tolist() == [4 * (1 + 2 + 3 + 4), 4 * (1 + 2 + 2 + 2)]  # causal; window of 2
    assert p["hbm_bytes"].tolist() == [4 * (2 * 2 + 2 * 1)] * 2  # Q, O at 2 bytes; K, V at 1
    d = decode_work(pd.DataFrame({**attn, "isl": [1, 1], "step": [100, 100]}))
    assert d["hbm_bytes"].tolist() == [100 * 2 + 4, 2 * 2 + 4]  # fp8 K and V over the context


def synthetic_rows(n: int, noise: float, seed: int, cap_w: float = np.inf) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    latency_s = rng.uniform(1e-3, 1e-2, n)
    flops = rng.uniform(0, 8e14, n) * latency_s  # up to 800 TFLOP/s
    hbm_bytes = rng.uniform(0, 4e12, n) * latency_s  # up to 4 TB/s
    power_w = IDLE_W + (J_PER_FLOP * flops + J_PER_HBM_BYTE * hbm_bytes) / latency_s
    power_w = np.minimum(power_w, cap_w) * (1 + noise * rng.standard_normal(n))
    return pd.DataFrame({"kind": "gemm", "flops": flops, "hbm_bytes": hbm_bytes,
                         "latency_s": latency_s, "power_w": power_w})


def test_fit_recovers_known_coefficients() -> None:
    rows = synthetic_rows(2000, noise=0.02, seed=0)
    idle_w, j_per_flop, j_per_hbm_byte = fit_power(rows)
    assert idle_w == pytest.approx(IDLE_W, rel=0.03)
    assert j_per_flop == pytest.approx(J_PER_FLOP, rel=0.03)
    assert j_per_hbm_byte == pytest.approx(J_PER_HBM_BYTE, rel=0.03)
    # by hand: 500 TFLOP/s and 2 TB/s draw 150 + 200 + 120 = 470 W
    one = pd.DataFrame({"kind": ["gemm"], "flops": [5e14], "hbm_bytes": [2e12], "latency_s": [1.0]})
    predicted_w = (design(one) @ np.array([idle_w, j_per_flop, j_per_hbm_byte])).item()
    assert predicted_w == pytest.approx(470, rel=0.02)


def test_capped_fit_recovers_coefficients_under_a_power_limit() -> None:
    rows = synthetic_rows(2000, noise=0.02, seed=1, cap_w=450.0)  # about a third of rows at the cap
    assert (rows["power_w"] > 0.97 * 450).mean() > 0.25
    coef = fit_power(rows, ("gemm",), cap_w=450.0)
    assert coef == pytest.approx([IDLE_W, J_PER_FLOP, J_PER_HBM_BYTE], rel=0.05)


@pytest.fixture(scope="module")
def h200() -> dict:
    if not (GPU_DATA / "kernels" / "h200_sxm").is_dir():
        pytest.skip(f"measured GPU tables not found at {GPU_DATA} (shared/gpu-data beside the checkout)")
    return fit_energy(GPU_DATA)


def test_h200_fit_is_physical_and_sourced(h200: dict) -> None:
    assert h200["min_latency_ms"] == 0.5  # where GEMM and MoE neighbour readings settle
    assert h200["near_idle_w"] < h200["idle_w"] < h200["power_limit_w"]
    assert 1e-14 < h200["j_per_flop"] < 5e-12 and 1e-12 < h200["j_per_hbm_byte"] < 5e-10
    assert h200["fit_rows"] > 10_000 and h200["held_out"]["rows"] > 3_000
    assert set(h200["held_out"]["per_kind"]) == {"gemm", "moe", "prefill", "decode"}
    for src in h200["source"]:
        assert (GPU_DATA / src["path"]).is_file() and src["version"] in src["path"]


def test_h200_noise_floor_and_what_is_reachable(h200: dict) -> None:
    """Why the bound below is out of reach: replicate prefill readings differ by > 10% (median),
    while the capped per-kind fit matches the reproducible GEMM and MoE rows within 5%."""
    assert h200["replicate_noise"]["prefill_twin_median_rel_diff"] > 0.10
    per_kind = h200["per_kind_capped_fit"]["held_out"]["per_kind"]
    assert per_kind["gemm"]["median_rel_err"] <= 0.05 and per_kind["moe"]["median_rel_err"] <= 0.05
