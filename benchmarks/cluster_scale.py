"""A fleet-sized run: 1,000 replicas and 1,000,000 requests (issue 15: <= 120 s on two cores with
two worker processes, <= 2 GB in all processes together).

Qwen3-30B-A3B on 2 x H100 (TP 2, the shipped measured-kernel profile) per replica, ShareGPT
lengths, Poisson arrivals at 1 req/s per replica (1,000 req/s in all, about 17 simulated
minutes), chunked:512 behind a round-robin router, replicas split over worker processes.
Per-request rows stream to parquet parts and gaps between tokens go to a histogram, so memory
stays bounded.

Memory is the peak of the proportional set size (PSS: shared pages split between the processes
sharing them, so forked workers are not counted twice) summed over this process and its
children, sampled every 0.2 s from /proc; the largest single RSS is printed beside it. Beside the
wall time: simulated iterations per wall second and per CPU second, in proportion to this
machine's bare SimPy and heapq event rates measured in the same run (benchmarks/baseline.py).

    python benchmarks/cluster_scale.py [REPLICAS] [REQUESTS] [WORKERS] [POLICY]
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.baseline import describe, event_rates, versus  # noqa: E402
from costmodel import CostModel, Parallelism, load_model, resolve_profile  # noqa: E402
from sim import simulate  # noqa: E402
from traces import WorkloadSpec, build_workload  # noqa: E402


def _tree(pid: int) -> list[int]:
    """pid and every descendant (from /proc's children lists)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def _kb(pid: int, field: str, name: str) -> int:
    try:
        with open(f"/proc/{pid}/{name}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak summed PSS and peak single RSS of this process tree, in MB."""

    def __init__(self, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak_pss_mb, self.peak_rss_mb = every_s, 0.0, 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            pids = _tree(os.getpid())
            pss = sum(_kb(p, "Pss:", "smaps_rollup") for p in pids) / 1024
            rss = max(_kb(p, "VmRSS:", "status") for p in pids) / 1024
            self.peak_pss_mb = max(self.peak_pss_mb, pss)
            self.peak_rss_mb = max(self.peak_rss_mb, rss)

    def stop(self) -> None:
        self._done.set()
        self.join()


def main() -> None:
    replicas = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    policy = sys.argv[4] if len(sys.argv) > 4 else "chunked:512"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    rates = event_rates()
    print(describe(rates))
    print(f"{replicas} replicas x 2 H100 (TP 2), {n:,} ShareGPT requests at {replicas} req/s, "
          f"{policy}, {workers} worker processes; target <= 120 s, <= 2 GB in all processes")
    sampler = MemorySampler()
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    w = build_workload(WorkloadSpec("sharegpt", rate=float(replicas), num_requests=n, seed=0))
    t1 = time.perf_counter()
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", resolve_profile("h100"), Parallelism(tp=2))
    with tempfile.TemporaryDirectory() as d:
        res = simulate(w.requests, cm, policy, num_replicas=replicas, stream_dir=Path(d),
                       workers=workers)
    t2 = time.perf_counter()
    sampler.stop()
    kids = os.times()
    cpu = time.process_time() - c0 + kids.children_user + kids.children_system
    m = res.metrics
    per_wall, per_cpu = m["iterations"] / (t2 - t1), m["iterations"] / cpu
    print(f"workload built in {t1 - t0:.1f} s; simulated in {t2 - t1:.1f} s wall, {t2 - t0:.1f} s "
          f"in all ({cpu:.0f} CPU s over all processes); {m['iterations']:,} iterations, "
          f"{m['completed']:,} requests finished, {cpu / n * 1e6:.0f} CPU us per request")
    print(f"peak memory: {sampler.peak_pss_mb:.0f} MB PSS summed over all processes, largest "
          f"single RSS {sampler.peak_rss_mb:.0f} MB")
    print(f"iterations per wall s {per_wall:,.0f} = {versus(per_wall, rates, 'iteration')}")
    print(f"iterations per CPU s  {per_cpu:,.0f} = {versus(per_cpu, rates, 'iteration')}")
    print(f"mean TTFT {m['mean_ttft_ms']:.0f} ms, p99 ITL {m['p99_itl_ms']:.1f} ms, "
          f"{m['request_throughput']:.0f} req/s")


if __name__ == "__main__":
    main()
