"""A fleet-sized run: 1,000 replicas and 1,000,000 requests (issue target: <= 5 min, <= 4 GB).

Compares against that target. Qwen3-30B-A3B on 2 x H100 (TP 2, the shipped measured-kernel
profile) per replica, ShareGPT lengths, Poisson arrivals at 1 req/s per replica (1,000 req/s in
all, about 17 simulated minutes),
chunked:512 behind a round-robin router. Per-request rows stream to parquet parts and gaps
between tokens go to a histogram, so memory stays bounded. Prints wall time and peak RSS (of
this process and its workers).

    python benchmarks/cluster_scale.py [REPLICAS] [REQUESTS] [WORKERS] [POLICY]
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from costmodel import CostModel, Parallelism, load_model, resolve_profile
from sim import simulate
from traces import WorkloadSpec, build_workload


def main() -> None:
    replicas = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else (os.cpu_count() or 1)
    policy = sys.argv[4] if len(sys.argv) > 4 else "chunked:512"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{replicas} replicas x 2 H100 (TP 2), {n:,} ShareGPT requests at {replicas} req/s, "
          f"{policy}, {workers} worker processes; target <= 300 s, <= 4 GB")
    t0 = time.perf_counter()
    w = build_workload(WorkloadSpec("sharegpt", rate=float(replicas), num_requests=n, seed=0))
    t1 = time.perf_counter()
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", resolve_profile("h100"), Parallelism(tp=2))
    with tempfile.TemporaryDirectory() as d:
        res = simulate(w.requests, cm, policy, num_replicas=replicas, stream_dir=Path(d),
                       workers=workers)
    t2 = time.perf_counter()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    m = res.metrics
    print(f"workload built in {t1 - t0:.1f} s; simulated in {t2 - t1:.1f} s "
          f"({m['iterations']:,} iterations, {m['completed']:,} requests finished)")
    print(f"peak RSS: main {own:.0f} MB, largest worker {kids:.0f} MB")
    print(f"mean TTFT {m['mean_ttft_ms']:.0f} ms, p99 ITL {m['p99_itl_ms']:.1f} ms, "
          f"{m['request_throughput']:.0f} req/s")


if __name__ == "__main__":
    main()
