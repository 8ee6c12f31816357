"""Simulation cost per request as a replica fills up (issue 15: at 90% of its capacity, <= 1.5x
what an idle replica costs per request).

For each policy: its capacity on one replica (the default study's SLO and workload, the
highest rate per replica meeting the 90% attainment target, as `layersim capacity` finds it),
then the same number of requests simulated at 10% and at 90% of that rate, CPU time per
request of each (the least of REPEATS runs: the development VM's timings vary by 5-7% from
run to run), and their ratio. The cost grows with the batch (every running request is touched
by every executed iteration) and with how often iterations cannot be fast-forwarded; beside
the figures, this machine's bare SimPy and heapq event rates (benchmarks/baseline.py).

    python benchmarks/load_cost.py [REQUESTS] [WORKLOAD] [REPEATS]
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baseline import describe, event_rates  # noqa: E402
from sim import simulate  # noqa: E402
from sim.capacity import max_rate, study_evaluator  # noqa: E402
from sim.study_file import make_study  # noqa: E402
from traces import WorkloadSpec, build_workload  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    workload = sys.argv[2] if len(sys.argv) > 2 else "sharegpt"
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(describe(event_rates()))
    print(f"{workload}, {n:,} requests per point, one replica of the default setup, CPU time the "
          f"least of {repeats} runs; target: 90% of capacity <= 1.5x the CPU per request of 10%")
    for policy in ("chunked:512", "layered"):
        study = make_study({"policies": [policy], "workload": workload})
        capacity = max_rate(study_evaluator(study), target=0.9, start_rate=0.5).point
        if capacity is None:
            print(f"{policy}: no rate meets the SLO")
            continue
        cm = study.cost_model()
        cost = {}
        for share in (0.1, 0.9):
            rate = share * capacity.rate
            requests = build_workload(WorkloadSpec(workload, rate=rate, num_requests=n,
                                                   seed=0)).requests
            runs = []
            for _ in range(repeats):
                start = time.process_time()
                res = simulate(requests, cm, policy)
                runs.append((time.process_time() - start) / n)
            cost[share] = min(runs)
            print(f"{policy:<12} {share:4.0%} of {capacity.rate:.3f} req/s: "
                  f"{cost[share] * 1e6:5.0f} CPU us per request, "
                  f"{len(res.iterations) / n:.1f} iteration rows per request, "
                  f"{res.metrics['iterations'] / n:.0f} iterations per request")
        print(f"{policy:<12} 90% / 10%: {cost[0.9] / cost[0.1]:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
