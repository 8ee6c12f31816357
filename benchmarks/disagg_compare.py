"""Co-located against disaggregated serving: Qwen3-30B-A3B on 8 x H100 (four TP-2 workers) at the
shipped measured-kernel profile, ShareGPT requests at a few rates.

Co-located: four replicas, chunked prefill, round-robin. Disaggregated: the same eight GPUs
split into prefill and decode workers (1 + 3 and 2 + 2), KV moved over each prefill GPU's
400 Gb/s port (costmodel/transfer.py; a datasheet figure, not a measurement). Prints TTFT, TPOT
and energy per output token for each, and the KV transfer and its wait.

Then whole-prompt against layer-wise transfer (`stream_kv`) on the default study's long prompts
(arxiv-long, 1.3 req/s, one prefill and one decode TP-2 worker), for chunked:512 and layered
prefill, on the preset 400 Gb/s port and on a 50 Gb/s one: how much of the transfer is left
after the first token (in the gap before the second).

    python benchmarks/disagg_compare.py [--requests 2000] [--rates 8 16 24]
"""

from __future__ import annotations

import argparse

import numpy as np

from costmodel import CostModel, Parallelism, load_model, resolve_profile
from costmodel.transfer import NETWORK_LATENCY_S, KVLink
from sim import simulate
from sim.disagg import Pool, simulate_disagg
from traces import WorkloadSpec, build_workload

KEYS = ("completed", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
        "energy_per_output_token_j")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rates", type=float, nargs="+", default=[8.0, 16.0, 24.0])
    ap.add_argument("--policy", default="chunked:2048")
    args = ap.parse_args()
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", resolve_profile("h100"), Parallelism(tp=2))
    print(f"Qwen3-30B-A3B, 8 x H100 as four TP-2 workers, {args.policy}, ShareGPT, "
          f"{args.requests} requests, seed 1; the shipped h100 profile")
    labels = ("done", "ttft_ms", "p99_ttft_ms", "tpot_ms", "p99_tpot_ms", "J/out_token",
              "kv_ms", "kv_wait_ms")
    print(f"{'rate':>5} {'setup':<26}" + "".join(f"{h:>12}" for h in labels))

    def cell(value: float | None) -> str:
        return f"{'-':>12}" if value is None else f"{value:>12.4g}"
    for rate in args.rates:
        reqs = build_workload(WorkloadSpec("sharegpt", rate=rate, num_requests=args.requests,
                                           seed=1)).requests
        runs = [("co-located 4", simulate(reqs, cm, args.policy, num_replicas=4).metrics)]
        for p, d in ((1, 3), (2, 2)):
            m = simulate_disagg(reqs, Pool(cm, args.policy, p), Pool(cm, args.policy, d)).metrics
            runs.append((f"disaggregated {p}P + {d}D", m))
        for name, m in runs:
            values = [m[k] for k in KEYS] + [m.get("mean_kv_transfer_ms"), m.get("mean_kv_wait_ms")]
            print(f"{rate:>5g} {name:<26}" + "".join(cell(v) for v in values))
    print("\nwhole-prompt against layer-wise KV transfer: arxiv-long, 1.3 req/s, 120 s, seed 1, "
          "1 prefill + 1 decode worker (TP 2 each)")
    print(f"{'link':>10} {'policy':<12} {'transfer':<11}" + "".join(
        f"{h:>15}" for h in ("ttft_ms", "kv_after_ttft", "2nd_gap_ms", "tpot_ms", "p99_itl_ms")))
    reqs = build_workload(WorkloadSpec("arxiv-long", rate=1.3, duration_s=120, seed=1)).requests
    for gbps in (50.0, 6.25):
        link = KVLink(gbps * 1e9, NETWORK_LATENCY_S, f"{gbps:g} GB/s")
        for policy in ("chunked:512", "layered"):
            for stream in (False, True):
                res = simulate_disagg(reqs, Pool(cm, policy), Pool(cm, policy), link,
                                      stream_kv=stream)
                m = res.metrics
                second = np.mean([g[0] for g in res.itls.per_request(
                    res.requests.loc[res.requests.output_tokens > 1, "req_id"].tolist())]) * 1e3
                values = (m["mean_ttft_ms"], m["mean_kv_exposed_ms"], second, m["mean_tpot_ms"],
                          m["p99_itl_ms"])
                print(f"{gbps:>6g} GB/s {policy:<12} {'as made' if stream else 'whole':<11}"
                      + "".join(f"{v:>15.4g}" for v in values))
    print(f"h100 profile: {cm.profile.accuracy_line()}; KV link: a datasheet figure (a guess)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
