"""Where `layersim replay-silicon`'s time goes: CPU seconds per distinct row study, slowest first.

Replays every supported vLLM row of a silicon CSV (default ../shared/gpu-data/silicon_h100.csv)
one study at a time with the default protocol, as `replay-silicon` does, and prints the CPU time
of each of the slowest, with what makes it slow: iterations, how many of them were
fast-forwarded, and preemptions. Compares against issue 12's target: the whole replay <= 60 s on
one core.

    python benchmarks/replay_rows.py [CSV] [--top 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from costmodel import ConfigError, CostModel
from sim.run import run_study
from sim.silicon import read_rows, row_clients, row_study, skip_reason
from sim.study import COST_KEYS

TARGET_S = 60.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="?", type=Path, default=Path("../shared/gpu-data/silicon_h100.csv"))
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    frame = read_rows(args.csv)
    frame = frame[frame.backend == "vllm"]
    seen: set[str] = set()
    models: dict[str, CostModel] = {}  # as replay() keeps them: one per model, GPU and TP
    timed = []
    for idx, row in frame.iterrows():
        if skip_reason(row) is not None:
            continue
        study = row_study(row, "h100", None)
        key = study.model_dump_json()
        if key in seen:  # replay() runs a repeated row once
            continue
        seen.add(key)
        start = time.process_time()  # a row's time includes building its cost model, if first
        try:
            cost_key = study.model_dump_json(include=COST_KEYS)
            if cost_key not in models:
                models[cost_key] = study.cost_model()
            _, _, (result,) = run_study(study, cost_model=models[cost_key], pool_gaps=False)
        except ConfigError as e:  # replay() reports such a row as skipped, with the reason
            print(f"row {idx}: skipped: {e}")
            continue
        cpu_s = time.process_time() - start
        it = result.iterations
        steps = int(it["iterations"].sum())
        folded = int(it.loc[it["iterations"] > 1, "iterations"].sum())
        timed.append((cpu_s, idx, row, steps, folded, int(result.metrics["preemptions"]),
                      study.tp))
    total = sum(t[0] for t in timed)
    print(f"{len(timed)} distinct row studies, {total:.1f} CPU s in all (target: the whole "
          f"replay <= {TARGET_S:.0f} s on one core)")
    print(f"{'row':>5} {'model':<26} {'isl':>5} {'osl':>5} {'clients':>7} {'tp':>3} {'CPU s':>7} "
          f"{'iterations':>10} {'fast-fwd':>9} {'preempt':>8}")
    for cpu_s, idx, row, steps, folded, preempted, tp in sorted(timed, key=lambda t: -t[0])[:args.top]:
        print(f"{idx:>5} {str(row.model_path):<26} {int(row.isl):>5} {int(row.osl):>5} "
              f"{row_clients(row):>7} {tp:>3} {cpu_s:>7.1f} {steps:>10,} "
              f"{folded:>9,} {preempted:>8,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
