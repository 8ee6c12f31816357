"""Wall time and peak memory of a capacity search on the default study (issue 6).

The search: the highest arrival rate per replica at which 90% of requests meet the default SLO
(TTFT <= 2 s, per-request P99 ITL <= 100 ms), for layered and for chunked:512 on the default
setup (Qwen3-30B-A3B, 2 x H100 TP 2, arxiv-long Poisson arrivals over 120 s), bisected to 2%.
Each point is a full simulation. There is no stated target beyond "interactive": it compares
against the one-second budget of a single default-study simulation (issue 3). Beside each
search, its simulated scheduler iterations per CPU second, in proportion to this machine's bare
SimPy and heapq event rates measured in the same run (benchmarks/baseline.py).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baseline import describe, event_rates, versus  # noqa: E402
from sim.capacity import max_rate, study_evaluator  # noqa: E402
from sim.study_file import make_study  # noqa: E402


def main() -> None:
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    rates = event_rates()
    print(describe(rates))
    for policy in ("layered", "chunked:512"):
        study = make_study({"policies": [policy]})
        start, cpu = time.perf_counter(), time.process_time()
        ans = max_rate(study_evaluator(study), target=0.9, start_rate=0.5)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rate = ans.point.rate if ans.point else float("nan")
        print(f"{policy:<12} {rate:6.3f} req/s per replica after {len(ans.search)} simulations: "
              f"{wall:5.1f} s wall ({wall / len(ans.search):.2f} s per point), peak RSS {rss:.0f} MB")
        iterations = sum(p.metrics["iterations"] for p in ans.search)
        print(f"{'':<12} {iterations:,} iterations simulated, {iterations / cpu:,.0f} per CPU s = "
              f"{versus(iterations / cpu, rates, 'iteration')}")


if __name__ == "__main__":
    main()
