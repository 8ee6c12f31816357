"""How many iterations per second one CPU core prices (issue target: >= 20,000).

Compares against that target: a 48-layer MoE (Qwen3-30B-A3B, TP 2 on H100) with 64 running
decodes at 4,096 context and one prefill tile (a 512-token chunk through all layers, or a
layered pass of an 8,192-token prompt through 3 layers). Prints plans priced per second of
this process's CPU time: on a shared machine wall time would also count other processes' turns.
Beside each, what one priced plan costs in this machine's bare SimPy events (the bare SimPy and
heapq event rates, benchmarks/baseline.py, are measured in the same run, also in CPU time).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baseline import describe, event_rates, versus  # noqa: E402
from costmodel import (  # noqa: E402
    CostModel,
    Parallelism,
    Tile,
    decode_tile,
    default_profile,
    load_gpu,
    load_model,
    resolve_profile,
)


def rate(cm: CostModel, plan: list[Tile], seconds: float = 2.0) -> float:
    """Plans per second over 1,000 variants whose decode contexts grow by one token each, as
    consecutive iterations do (identical plans would hit the cost model's per-plan memo)."""
    variants = [[t._replace(t0=t.t0 + i, t1=t.t1 + i, num_cached=t.num_cached + i) if t.logits else t
                 for t in plan] for i in range(1000)]
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for p in variants:
            cm.price(p)
        n += len(variants)
    return n / (time.process_time() - start)


def main() -> None:
    model = load_model("qwen3-30b-a3b")
    profiles = {"measured-kernel h100": resolve_profile("h100"),
                "datasheet h100": default_profile(load_gpu("h100"))}
    decodes = [decode_tile(i, 4096, 48) for i in range(64)]
    cases = {
        "64 decodes + 512-token chunk": decodes + [Tile(64, 1024, 1536, 0, 48, 1024, False)],
        "64 decodes + layered pass (8192 tok, 3 layers)": decodes + [Tile(64, 0, 8192, 0, 3, 0, False)],
        "64 decodes only": decodes,
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    rates = event_rates()
    print(describe(rates))
    print("target: >= 20,000 plans/s on one core")
    for label, prof in profiles.items():
        cm = CostModel(model, "h100", prof, Parallelism(tp=2))
        for name, plan in cases.items():
            per_s = rate(cm, plan)
            print(f"{label:<22} {name:<50} {per_s:>10,.0f} plans/s  = "
                  f"{versus(per_s, rates, 'plan')}")


if __name__ == "__main__":
    main()
