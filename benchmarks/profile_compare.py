"""The default study on the datasheet profile against the measured-kernel profile.

Compares the two ways of pricing GPU work for the same study (Qwen3-30B-A3B, 2 x H100 TP 2,
arxiv-long at 1.3 req/s for 120 s, chunked:512 against layered): datasheet peaks with guessed
efficiencies (`--profile datasheet`) and the shipped profile fitted to measured vLLM kernel
tables (the default). Also prints what the published layered-prefill study measured on its own
engine (arXiv 2510.08055; the figures quoted in issue 11): chunked mean TTFT about 2,800 ms.

    python benchmarks/profile_compare.py
"""

from __future__ import annotations

import platform

from sim.run import run_study
from sim.study_file import make_study

ROWS = (("mean_ttft_ms", "TTFT mean (ms)", "{:.0f}"), ("p99_ttft_ms", "TTFT p99 (ms)", "{:.0f}"),
        ("mean_tpot_ms", "TPOT mean (ms)", "{:.1f}"), ("p99_itl_ms", "ITL p99 (ms)", "{:.1f}"),
        ("mean_e2el_ms", "E2E mean (ms)", "{:.0f}"), ("energy_per_token_j", "energy / token (J)", "{:.4f}"))


def main() -> None:
    print(f"machine: {platform.processor() or platform.machine()} (simulation only; no GPU ran)")
    results = {}
    for label, profile in (("datasheet", "datasheet"), ("measured", None)):
        study = make_study({"profile": profile} if profile else {})
        _, _, runs = run_study(study)
        results[label] = {r.policy: r.metrics for r in runs}
    policies = list(results["datasheet"])
    head = f"{'':<20}" + "".join(f"{f'{p} / {lab}':>25}" for p in policies for lab in results)
    print(head)
    for key, name, fmt in ROWS:
        cells = "".join(f"{fmt.format(results[lab][p][key]):>25}" for p in policies for lab in results)
        print(f"{name:<20}{cells}")
    print("published study (its own engine, 2 x H100): chunked mean TTFT about 2,800 ms")


if __name__ == "__main__":
    main()
