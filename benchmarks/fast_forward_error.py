"""How far fast-forwarded runs are from step-by-step ones with the measured-kernel profiles.

Prefill stretches price every iteration exactly; steady decode stretches price their first and
last iteration and interpolate the rest (an arithmetic series of latencies). That is exact for
the datasheet roofline, where decode attention's time is affine in the KV read (the tests hold
it to 1e-9 s per token), but with measured kernel tables decode attention's time is
interpolated between measured contexts in log space, which is not affine: this prints the
difference it makes, per built-in policy, on the shipped H100 profile (Qwen3-30B-A3B, TP 2):
the largest difference of any output token's time, and the relative differences of mean TTFT,
mean ITL and energy per token.

    python benchmarks/fast_forward_error.py [REQUESTS]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from costmodel import CostModel, Parallelism, load_model, resolve_profile  # noqa: E402
from sim import simulate  # noqa: E402
from traces import WorkloadSpec, build_workload  # noqa: E402

POLICIES = ("chunked:512", "layered", "hybrid", "adaptive:30", "prefill-first")


def _token_times(res) -> dict[int, np.ndarray]:  # type: ignore[no-untyped-def]
    ids = res.requests["req_id"].tolist()
    firsts = res.requests["first_token_s"].tolist()
    return {rid: (first + np.concatenate(([0.0], np.cumsum(g))) if not math.isnan(first) else g)
            for rid, first, g in zip(ids, firsts, res.itls.per_request(ids), strict=True)}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", resolve_profile("h100"), Parallelism(tp=2))
    print(f"qwen3-30b-a3b, 2 x H100 TP 2, shipped measured-kernel profile; {n} requests per run")
    for workload, rate in (("sharegpt", 4.0), ("arxiv-long", 1.3)):
        requests = build_workload(WorkloadSpec(workload, rate=rate, num_requests=n, seed=0)).requests
        for policy in POLICIES:
            fast = simulate(requests, cm, policy, fast_forward=True)
            slow = simulate(requests, cm, policy, fast_forward=False)
            a, b = _token_times(fast), _token_times(slow)
            worst = max(float(np.max(np.abs(a[r] - b[r]), initial=0.0)) for r in a)
            rel = {k: fast.metrics[k] / slow.metrics[k] - 1
                   for k in ("mean_ttft_ms", "mean_itl_ms", "energy_per_token_j")}
            print(f"{workload:<11} {policy:<14} max token-time difference {worst * 1e6:8.2f} us; "
                  + ", ".join(f"{k} {v:+.2e}" for k, v in rel.items())
                  + f"; rows {len(fast.iterations):,} vs {len(slow.iterations):,}")


if __name__ == "__main__":
    main()
