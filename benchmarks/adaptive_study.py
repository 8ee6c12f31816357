"""Static layer grouping against adaptive grouping: the TTFT-TBT trade-off across rates.

Compares against the published rule (layered: G = ceil(L/512)), its power-of-two variants
(layered:4, layered:16), chunked prefill at 512 and hybrid, on the default setup (Qwen3-30B-A3B,
2 x H100 TP 2) with the default workload (arxiv-long) and with ShareGPT, at several rates.
Prints one row per (workload, rate, policy): mean and p99 TTFT, p99 ITL (the TBT tail), SLO
attainment and energy per token; writes sweep.json and report.html under the output folder.

    python benchmarks/adaptive_study.py [OUT_DIR] [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sim.study_file import make_study
from sim.sweep import sweep

POLICIES = ["chunked:512", "layered", "layered:4", "layered:16", "hybrid", "adaptive:30", "adaptive:60"]
WORKLOADS = {"arxiv-long": [0.5, 1.0, 1.5, 2.0, 2.5], "sharegpt": [2.0, 4.0, 6.0, 8.0]}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    out = Path(args[0]) if args else Path("results/adaptive_study")
    duration = 60.0 if quick else 180.0
    print(f"{'workload':<11}{'rate':>6}  {'policy':<12}{'TTFT mean':>10}{'TTFT p99':>10}"
          f"{'ITL p99':>9}{'SLO':>8}{'J/token':>9}")

    def show(row: dict) -> None:
        print(f"{row['workload']:<11}{row['rate']:>6.2f}  {row['policy']:<12}{row['mean_ttft_ms']:>10.0f}"
              f"{row['p99_ttft_ms']:>10.0f}{row['p99_itl_ms']:>9.1f}{row['slo_attainment']:>8.1%}"
              f"{row['energy_per_token_j']:>9.4f}", flush=True)

    start = time.perf_counter()
    for workload, rates in WORKLOADS.items():
        study = make_study({"workload": workload, "duration_s": duration, "policies": POLICIES,
                            "slo_ttft_ms": 2000, "slo_itl_ms": 50})
        sweep(study, rates[:3] if quick else rates, out / workload,
              on_row=lambda r, w=workload: show({**r, "workload": w}))
        from reports import write_report
        write_report(out / workload)
    print(f"\nwrote {out}/<workload>/sweep.json and report.html in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
