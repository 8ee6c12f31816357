"""Wall time and fit errors of `calibrate --device cpu --quick` on tiny-moe, repeated N times.

Method: run the pipeline in-process N times (default 3) and print each run's seconds and
held-out median errors per class, then the spread, to size CI timeouts and the test's bound.
Usage: python benchmarks/calibrate_cpu.py [N] [--model tiny-moe]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from calibrate.run import format_fit_table, run_calibration


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="?", type=int, default=3)
    ap.add_argument("--model", default="tiny-moe")
    args = ap.parse_args()
    medians: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            t0 = time.perf_counter()
            profile = run_calibration(args.model, 1, "cpu", True, Path(tmp) / "p.json")
            wall = time.perf_counter() - t0
            if i == 0:
                print(format_fit_table(profile))
            errs = {c: e["median_rel_err"] for c, e in profile.fit_errors.items()}
            for c, v in errs.items():
                medians.setdefault(c, []).append(v)
            print(f"run {i}: {wall:.1f} s  " + "  ".join(f"{c} {v:.0%}" for c, v in errs.items()))
    for c, vs in medians.items():
        print(f"{c:<14} held-out median: min {min(vs):.0%} max {max(vs):.0%}")


if __name__ == "__main__":
    main()
