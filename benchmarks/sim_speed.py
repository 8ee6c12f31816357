"""Wall time and peak memory of the simulator on the default study and on a real hour.

Targets (issue 3): the default study (Qwen3-30B-A3B, 2 x H100 TP 2, arxiv-long Poisson 1.3
req/s for 120 s, chunked:512 and layered) in <= 1 s, and the Azure 2023 conversation trace
(19,366 requests over an hour, real arrival times) on 8 replicas in <= 10 s, on one core.
Each case runs in a fresh process so that peak RSS (ru_maxrss) is its own. Beside each, the
simulated scheduler iterations and records (a step, or a steady stretch of many iterations
simulated at once) per CPU second of its run (which includes loading the profile and building
the cost model), in proportion to this machine's bare SimPy and heapq event rates measured in
the same run (benchmarks/baseline.py).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baseline import describe, event_rates, versus  # noqa: E402

CASES = {
    "default study (2 policies)": "from sim.run import run_study\n"
                                  "from sim.study_file import make_study\n"
                                  "_, _, results = run_study(make_study({}))",
    "azure-conv hour, 8 replicas, chunked:512": (
        "from sim.run import run_study\nfrom sim.study_file import make_study\n"
        "_, _, results = run_study(make_study({'workload': 'azure-conv', 'rate': None,"
        " 'duration_s': None, 'num_requests': 10**9, 'replicas': 8, 'policies': ['chunked:512']}))"),
    "azure-conv hour, 8 replicas, layered": (
        "from sim.run import run_study\nfrom sim.study_file import make_study\n"
        "_, _, results = run_study(make_study({'workload': 'azure-conv', 'rate': None,"
        " 'duration_s': None, 'num_requests': 10**9, 'replicas': 8, 'policies': ['layered']}))"),
}

RUNNER = """
import resource, time, json
t0 = time.perf_counter()
import sim.run, sim.study_file  # imports are not part of the figure
t1, c1 = time.perf_counter(), time.process_time()
exec(compile({code!r}, 'case', 'exec'))
t2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({{"import_s": t1 - t0, "run_s": t2 - t1, "cpu_s": c2 - c1,
                   "iterations": sum(r.metrics["iterations"] for r in results),
                   "records": sum(len(r.iterations) for r in results),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> None:
    print(f"machine: {platform.machine()}, {platform.processor() or '?'}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    rates = event_rates()
    print(describe(rates))
    for name, code in CASES.items():
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", RUNNER.format(code=code)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{name:<45} run {r['run_s']:6.2f} s  (imports {r['import_s']:.2f} s)  "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB  [{time.perf_counter() - start:.1f} s total]")
        it, rec, cpu = r["iterations"], r["records"], r["cpu_s"]
        print(f"{'':<45} {it:,} iterations in {rec:,} records (a step or a steady stretch each), "
              f"{cpu:.2f} CPU s: {it / cpu:,.0f} iterations/s = {versus(it / cpu, rates, 'iteration')}"
              f"; {rec / cpu:,.0f} records/s = {rec / cpu / rates[0]:.4f} x bare SimPy")


if __name__ == "__main__":
    main()
