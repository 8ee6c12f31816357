"""MXFP4 expert kernels on H100: vLLM's OAI-Triton kernel (what the kernel tables time at
gpt-oss's shapes) against Marlin (what InferenceX's gpt-oss recipe runs, VLLM_MXFP4_USE_MARLIN=1).

1. From the measured MoE table (../shared/gpu-data/kernels/h100_sxm/moe/vllm/0.24.0): for each
   MXFP4 kernel, rows with one GPU (moe_tp_size = moe_ep_size = 1) and balanced routing, the
   median over shapes per batch size of the expert-weight bytes streamed per second (experts
   touched = min(E, tokens x top-k), 4.25 bits a weight, three matrices of hidden x inter) and of
   the FLOP rate (2 x 3 x tokens x top-k x hidden x inter). The Triton rows are gpt-oss's shapes,
   the Marlin rows another model's (hidden 3584, inter 3072, 896 experts, top-16): the comparison
   is across shapes.
2. The transfer that does not work: gpt-oss-120b on 4 x H100 priced with the shipped profile and
   with a copy whose gpt-oss-shape MXFP4 rows are removed, so that the nearest measured MXFP4
   shape (the Marlin rows) prices its experts.

    python benchmarks/mxfp4_kernels.py [KERNELS_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from costmodel import CostModel, Parallelism, Tile, decode_tile, load_model, resolve_profile

TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def table_rates(kernels: Path) -> None:
    moe = pd.read_parquet(kernels / "h100_sxm" / "moe" / "vllm" / "0.24.0" / "moe_perf.parquet")
    x = moe[(moe.moe_dtype == "w4a16_mxfp4") & (moe.moe_tp_size == 1) & (moe.moe_ep_size == 1)
            & (moe.distribution == "balanced")].copy()
    touched = np.minimum(x.num_experts, x.num_tokens * x.topk)
    x["weight_GBps"] = touched * 3 * x.hidden_size * x.inter_size * 4.25 / 8 / (x.latency * 1e-3) / 1e9
    x["TFLOPs"] = 2 * 3 * x.num_tokens * x.topk * x.hidden_size * x.inter_size / (x.latency * 1e-3) / 1e12
    print("1. MXFP4 MoE rows, one GPU, balanced routing: median over shapes per batch size")
    for kernel, g in x.groupby("kernel_source"):
        shapes = sorted({(int(h), int(i), int(e), int(k)) for h, i, e, k in
                         g[["hidden_size", "inter_size", "num_experts", "topk"]].itertuples(index=False)})
        print(f"  {kernel}\n    shapes (hidden, inter, experts, top-k): {shapes}")
        med = g[g.num_tokens.isin(TOKENS)].groupby("num_tokens")[["weight_GBps", "TFLOPs"]].median()
        for t, row in med.iterrows():
            print(f"    {int(t):>6} tokens: {row.weight_GBps:>7.0f} GB/s of expert weights, "
                  f"{row.TFLOPs:>6.1f} TFLOP/s")


def transfer() -> None:
    model = load_model("openai/gpt-oss-120b")
    shipped = resolve_profile("h100", None)
    t = shipped.tables["expert_gemm"]
    cols = t["columns"]
    keep = ~((np.asarray(cols["dtype"]) == "mxfp4") & (np.asarray(cols["hidden"]) == 2880))
    marlin_only = {**t, "columns": {k: [v for v, m in zip(vals, keep, strict=True) if m]
                                    for k, vals in cols.items()},
                   "latency_s": [v for v, m in zip(t["latency_s"], keep, strict=True) if m]}
    nearest = shipped.model_copy(update={"tables": {**shipped.tables, "expert_gemm": marlin_only}})
    L = model.num_layers
    plans = {"prefill of 8192 tokens": [Tile(0, 0, 8192, 0, L, 0, True)],
             "4 decodes at 1500 context": [decode_tile(i, 1500, L) for i in range(4)]}
    print("2. gpt-oss-120b on 4 x H100, one iteration (ms): shipped profile (Triton rows at its "
          "shape) against the nearest measured MXFP4 shape (Marlin rows, another model's)")
    for name, plan in plans.items():
        got = [CostModel(model, p.gpu, p, Parallelism(4, 1)).price(plan).latency_s * 1e3
               for p in (shipped, nearest)]
        print(f"  {name:<26} {got[0]:>8.1f} {got[1]:>8.1f}")


def main() -> int:
    kernels = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared/gpu-data/kernels")
    table_rates(kernels)
    transfer()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
