"""Fit EnergyParams (idle_w, j_per_flop, j_per_hbm_byte) to the NVML power of measured kernel tables.

Algorithm. Each row of the GEMM, fused-MoE, prefill- and decode-attention tables is one kernel
shape with its latency (ms per call) and NVML power (W, over a loop of >= 1 s). From the shape we
count FLOPs and HBM bytes, drop rows shorter than a settling cut, and fit
    power_w = idle_w + j_per_flop * flops_per_s + j_per_hbm_byte * hbm_bytes_per_s
(costmodel's energy formula divided by latency) by NNLS on relative residuals. A quarter of the
shapes are held out whole: GEMM (n, k), MoE (hidden, inter, experts, top-k), attention (heads,
kv heads, head_dim). A second fit, reported beside it, keeps one idle_w but gives each kernel kind
its own j_per_flop and j_per_hbm_byte and caps the prediction at power_limit.

The cut. Neighbouring rows of one series with latencies within 10% (GEMM m and m+1, MoE token
counts on a flat stretch) should read the same power. The upper quartile of their disagreement is
10-80% below 0.1 ms and reaches its floor (~1%, as for kernels >= 1 ms) at 0.3 ms for GEMM and
0.5 ms for MoE, so `settled_latency_ms` picks 0.5 ms. Attention never gets there (decode
neighbours: 15-20% at any latency), so no cut cleans it.

What the data allows (H200, vLLM 0.22.0): held-out median 20% / p90 33% for the global fit, 6.7% /
33% for the per-kind capped fit (GEMM and MoE 1.5% median). The p90 cannot reach 15% because
* attention readings never settle: prefill shapes measured twice (bf16 and fp8 KV cache, same
  latency) differ by a median of 14% and a p90 of 39% at every latency up to 100 ms;
* most GEMM and MoE rows above the cut sit at the 700 W limit, and ~10% of them read isolated
  150-560 W values that the m+1 neighbour does not repeat.

The intercept. idle_w is the static power while a kernel loop runs: clocks and voltage are up, and
it absorbs the concave rise of power with utilisation. It fits ~360 W; the lowest readings (loops
of ~10 us kernels, the GPU mostly waiting) are ~135 W (`near_idle_w`), about NVML's idle. So idle_w
suits the busy time of an iteration (costmodel multiplies it by iteration latency) but overstates
a serving GPU between iterations about 2.6x: price gaps at near_idle_w.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import least_squares, nnls

DTYPE_BYTES = {"bfloat16": 2.0, "fp8": 1.0, "fp8_block": 1.0, "mxfp4": 0.53125, "w4a16_mxfp4": 0.53125}
TABLES = {"gemm": "gemm/{fw}/{v}/gemm_perf.parquet", "moe": "moe/{fw}/{v}/moe_perf.parquet",
          "prefill": "attention/{fw}/{v}/context_attention_perf.parquet",
          "decode": "attention/{fw}/{v}/generation_attention_perf.parquet"}
HOLDOUT_EVERY = 4  # one shape in four (by hash) is held out
CUT_GRID_MS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
FLOOR_FROM_MS = 1.0  # kernels this long read reproducibly: their disagreement is the floor
NEIGHBOUR_LATENCY_RATIO = 0.9
HEADS = ["num_heads", "num_key_value_heads", "head_dim"]


def _key(df: pd.DataFrame, prefix: str, cols: list[str]) -> pd.Series:
    return prefix + pd.Series(map("/".join, df[cols].astype(str).to_numpy()), index=df.index)


def gemm_work(df: pd.DataFrame) -> pd.DataFrame:
    """Dense GEMM m x k -> n: 2mnk FLOPs; reads A and B in the weight dtype, writes bf16 C."""
    w = df["gemm_dtype"].map(DTYPE_BYTES)
    m, n, k = (df[c].astype(float) for c in ("m", "n", "k"))
    return pd.DataFrame({"flops": 2 * m * n * k, "hbm_bytes": (m * k + k * n) * w + 2 * m * n,
                         "group": _key(df, "gemm:", ["n", "k"]), "scan": m,
                         "series": _key(df, "gemm:", ["gemm_dtype", "n", "k"])})


def moe_work(df: pd.DataFrame) -> pd.DataFrame:
    """One rank's fused MoE for balanced routing: with expert parallelism a rank owns E/ep experts
    and, balanced, gets 1/ep of the token-expert pairs. Bytes are the distinct local experts a
    batch touches, E/ep * (1 - (1 - k/E)^tokens), each 3 * hidden * inter/tp weights."""
    w = df["moe_dtype"].map(DTYPE_BYTES)
    t, e, k = (df[c].astype(float) for c in ("num_tokens", "num_experts", "topk"))
    ep, hidden = df["moe_ep_size"].astype(float), df["hidden_size"].astype(float)
    inter = df["inter_size"] / df["moe_tp_size"]
    experts_touched = e / ep * (1 - (1 - k / e) ** t)
    shape = ["hidden_size", "inter_size", "num_experts", "topk"]
    return pd.DataFrame({"flops": 2 * t * k * 3 * hidden * inter / ep,
                         "hbm_bytes": experts_touched * 3 * hidden * inter * w,
                         "group": _key(df, "moe:", shape), "scan": t,
                         "series": _key(df, "moe:", ["moe_dtype", *shape, "moe_tp_size", "moe_ep_size"])})


def _context(df: pd.DataFrame, length: pd.Series) -> np.ndarray:
    """Keys each query attends to: the whole context, or at most window_size of it."""
    window = df["window_size"].to_numpy(dtype=float)
    return np.where(window > 0, np.minimum(window, length), length)


def prefill_work(df: pd.DataFrame) -> pd.DataFrame:
    """Causal prefill: query i attends to min(i, window) keys, 4 * head_dim FLOPs per head and key;
    reads Q, K, V and writes O once."""
    b, isl = df["batch_size"].astype(float), df["isl"].astype(float)
    w = _context(df, isl)
    keys_per_seq = w * (w + 1) / 2 + (isl - w) * w  # sum over queries i of min(i, window)
    h, kvh, d = (df[c].astype(float) for c in HEADS)
    q_o = 2 * h * d * df["attn_dtype"].map(DTYPE_BYTES)
    k_v = 2 * kvh * d * df["kv_cache_dtype"].map(DTYPE_BYTES)
    return pd.DataFrame({"flops": 4 * b * h * d * keys_per_seq, "hbm_bytes": b * isl * (q_o + k_v),
                         "group": _key(df, "attn:", HEADS), "scan": b,
                         "series": _key(df, "prefill:", [*HEADS, "kv_cache_dtype", "window_size", "isl"])})


def decode_work(df: pd.DataFrame) -> pd.DataFrame:
    """One new token per sequence over `step` cached tokens: the KV cache read dominates bytes."""
    b = df["batch_size"].astype(float)
    h, kvh, d = (df[c].astype(float) for c in HEADS)
    ctx = _context(df, df["step"].astype(float))
    kv = b * ctx * 2 * kvh * d * df["kv_cache_dtype"].map(DTYPE_BYTES)
    return pd.DataFrame({"flops": 4 * b * h * d * ctx, "hbm_bytes": kv + b * 2 * h * d * 2,
                         "group": _key(df, "attn:", HEADS), "scan": df["step"].astype(float),
                         "series": _key(df, "decode:", [*HEADS, "kv_cache_dtype", "window_size",
                                                         "batch_size"])})


WORK = {"gemm": gemm_work, "moe": moe_work, "prefill": prefill_work, "decode": decode_work}


def load_rows(kernels_dir: Path, gpu: str, version: str, framework: str = "vllm") -> pd.DataFrame:
    """All four tables as rows of kind, flops, hbm_bytes, latency_s, power_w, power_limit_w."""
    frames = []
    for kind, rel in TABLES.items():
        raw = pd.read_parquet(kernels_dir / gpu / rel.format(fw=framework, v=version))
        if kind == "moe":  # skewed routing touches other experts than the uniform formula counts
            raw = raw[raw["distribution"] == "balanced"]
        dtype_col = {"gemm": "gemm_dtype", "moe": "moe_dtype"}.get(kind, "kv_cache_dtype")
        raw = raw[raw[dtype_col].isin(list(DTYPE_BYTES))]
        work = WORK[kind](raw)
        work["kind"], work["dtype"], work["latency_s"] = kind, raw[dtype_col], raw["latency"] / 1e3
        work["power_w"], work["power_limit_w"] = raw["power"], raw["power_limit"]
        frames.append(work)
    rows = pd.concat(frames, ignore_index=True)
    rows["held_out"] = rows["group"].isin(held_out_groups(rows["group"].unique()))
    return rows


def held_out_groups(groups: np.ndarray) -> set[str]:
    """Every HOLDOUT_EVERY-th shape of each family in hash order: stable across runs and row
    order, and a quarter of every family, which a plain hash modulo does not promise."""
    held: set[str] = set()
    for family in {str(g).split(":")[0] for g in groups}:
        members = sorted((str(g) for g in groups if str(g).startswith(family + ":")),
                         key=lambda g: zlib.crc32(g.encode()))
        held.update(members[::HOLDOUT_EVERY])
    return held


def neighbour_disagreement(rows: pd.DataFrame) -> pd.DataFrame:
    """|dP| / P between consecutive rows of one series whose latencies are within 10%: two
    readings of nearly the same work, so their disagreement is measurement noise."""
    r = rows.sort_values(["series", "scan"])
    prev = r.shift(1)
    lat_ratio = np.minimum(r["latency_s"], prev["latency_s"]) / np.maximum(r["latency_s"], prev["latency_s"])
    ok = (r["series"] == prev["series"]) & (lat_ratio >= NEIGHBOUR_LATENCY_RATIO)
    rel = (r["power_w"] - prev["power_w"]).abs() / np.minimum(r["power_w"], prev["power_w"])
    return pd.DataFrame({"kind": r["kind"], "latency_ms": np.minimum(r["latency_s"], prev["latency_s"]) * 1e3,
                         "rel_diff": rel})[ok]


def settled_latency_ms(rows: pd.DataFrame, kinds: tuple[str, ...] = ("gemm", "moe")) -> float:
    """Shortest grid latency from which the upper quartile of neighbour disagreement, in the
    octave [cut, 2 cut), is within twice its floor, in every table that has near-twin rows."""
    pairs = neighbour_disagreement(rows)
    cut_ms = CUT_GRID_MS[0]
    for kind in kinds:
        p = pairs[pairs["kind"] == kind]
        floor = p.loc[p["latency_ms"] >= FLOOR_FROM_MS, "rel_diff"].quantile(0.75)
        for c in CUT_GRID_MS:
            octave = p.loc[(p["latency_ms"] >= c) & (p["latency_ms"] < 2 * c), "rel_diff"]
            if len(octave) and octave.quantile(0.75) <= 2 * floor:
                cut_ms = max(cut_ms, c)
                break
        else:
            cut_ms = CUT_GRID_MS[-1]
    return cut_ms


def design(rows: pd.DataFrame, kinds: tuple[str, ...] = ()) -> np.ndarray:
    """Columns (1, FLOP/s, byte/s); with kinds, one FLOP/s and one byte/s column per kind."""
    fps, bps = (rows[c].to_numpy() / rows["latency_s"].to_numpy() for c in ("flops", "hbm_bytes"))
    masks = [rows["kind"].to_numpy() == k for k in kinds] or [np.ones(len(rows), dtype=bool)]
    return np.column_stack([np.ones(len(rows))] + [fps * m for m in masks] + [bps * m for m in masks])


def fit_power(rows: pd.DataFrame, kinds: tuple[str, ...] = (), cap_w: float = np.inf) -> np.ndarray:
    """NNLS of power on `design`: [idle_w, j_per_flop..., j_per_hbm_byte...]. With a finite cap_w,
    fit min(cap_w, linear) from the NNLS of the rows below the cap, with a robust loss: a reading
    at the limit only says the linear demand reaches it, and ~10% of those rows are isolated low
    readings that would otherwise drag every coefficient."""
    below = rows[rows["power_w"] < 0.97 * cap_w]
    a = design(below, kinds) / below["power_w"].to_numpy()[:, None]  # relative residuals
    scale = np.linalg.norm(a, axis=0)  # columns span 1 to 1e14: rescale or NNLS loses precision
    scale[scale == 0] = 1.0
    start, _ = nnls(a / scale, np.ones(len(below)))
    if np.isinf(cap_w):
        return np.asarray(start / scale)
    x, p = design(rows, kinds) / scale, rows["power_w"].to_numpy()
    res = least_squares(lambda c: np.minimum(x @ c, cap_w) / p - 1, start, bounds=(0, np.inf),
                        loss="soft_l1", f_scale=0.05)
    return np.asarray(res.x / scale)


def rel_errors(coef: np.ndarray, rows: pd.DataFrame, kinds: tuple[str, ...] = (),
               cap_w: float = np.inf) -> pd.Series:
    """|predicted - measured| / measured power; the same as on energy per call."""
    pred_w = np.minimum(design(rows, kinds) @ coef, cap_w)
    return pd.Series(np.abs(pred_w / rows["power_w"].to_numpy() - 1), index=rows.index)


def summary(err: pd.Series) -> dict[str, Any]:
    return {"median_rel_err": float(err.median()), "p90_rel_err": float(err.quantile(0.9)), "rows": len(err)}


def _per_kind(err: pd.Series, rows: pd.DataFrame) -> dict[str, Any]:
    return {str(k): summary(e) for k, e in err.groupby(rows.loc[err.index, "kind"])}


def replicate_noise(rows: pd.DataFrame) -> dict[str, Any]:
    """Prefill rows measured twice (bf16 and fp8 KV cache: same shape, latency within 25%)."""
    p = rows[rows["kind"] == "prefill"]
    shape = p["series"].str.replace(r"/(bfloat16|fp8)/", "/", regex=True) + "#" + p["scan"].astype(str)
    twin = p.assign(shape=shape).pivot_table(index="shape", columns="dtype", values=["power_w", "latency_s"])
    twin = twin.dropna()
    pw = twin["power_w"][twin["latency_s"].min(axis=1) / twin["latency_s"].max(axis=1) >= 0.8]
    rel = (pw["bfloat16"] - pw["fp8"]).abs() / pw.mean(axis=1)
    return {"prefill_twin_median_rel_diff": float(rel.median()),
            "prefill_twin_p90_rel_diff": float(rel.quantile(0.9)), "pairs": len(rel)}


def fit_energy(tables_dir: Path, gpu: str = "h200_sxm", version: str = "0.22.0") -> dict[str, Any]:
    """Fit on the kernel tables under tables_dir (the gpu-data folder, or its kernels/ folder)."""
    root = tables_dir.parent if tables_dir.name == "kernels" else tables_dir
    rows = load_rows(root / "kernels", gpu, version)
    cut_ms = settled_latency_ms(rows)
    settled = rows[rows["latency_s"] * 1e3 >= cut_ms]
    fit_rows, held = settled[~settled["held_out"]], settled[settled["held_out"]]
    coef = fit_power(fit_rows)
    err = rel_errors(coef, held)
    cap_w = float(rows["power_limit_w"].min())
    kinds = tuple(TABLES)
    k_coef = fit_power(fit_rows, kinds, cap_w)
    k_err = rel_errors(k_coef, held, kinds, cap_w)
    n = len(kinds)
    return {
        "idle_w": float(coef[0]), "j_per_flop": float(coef[1]), "j_per_hbm_byte": float(coef[2]),
        "held_out": {**summary(err), "per_kind": _per_kind(err, held)},
        "fit_rows": len(fit_rows),
        "min_latency_ms": cut_ms,
        "near_idle_w": float(rows["power_w"].quantile(0.01)),
        "power_limit_w": cap_w,
        "per_kind_capped_fit": {  # one static power; energy per FLOP and byte per kernel kind
            "idle_w": float(k_coef[0]),
            "j_per_flop": dict(zip(kinds, map(float, k_coef[1:1 + n]), strict=True)),
            "j_per_hbm_byte": dict(zip(kinds, map(float, k_coef[1 + n:]), strict=True)),
            "held_out": {**summary(k_err), "per_kind": _per_kind(k_err, held)}},
        "replicate_noise": replicate_noise(settled),
        "source": [{"path": f"kernels/{gpu}/{rel.format(fw='vllm', v=version)}", "framework": "vllm",
                    "version": version} for rel in TABLES.values()],
    }
