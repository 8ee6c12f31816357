"""A first-order estimate of what modelling vLLM's async scheduling would do to the replay's
TTFT errors (not a simulation: the replay does not model async scheduling).

With `--async-scheduling` (on in InferenceX's recipes) vLLM plans iteration k+1 while k runs, so
a request that arrives mid-iteration joins k+2 instead of k+1. In a closed loop the engine is
always busy, so to first order every TTFT grows by one iteration; the steady iteration time is
what the replay predicts as TPOT. This adds the predicted TPOT to each row's predicted TTFT in a
`replay-silicon --out DIR` folder and prints |TTFT error| per model and for the held-out models,
before and after. What it leaves out (batch composition changes, prefill iterations being longer
than decode ones, the refit it would need) is why it is an estimate.

    python benchmarks/async_estimate.py DIR [--fit-model meta-llama/Llama-3.1-70B]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path, help="a replay-silicon --out folder (its replay.csv)")
    ap.add_argument("--fit-model", default="meta-llama/Llama-3.1-70B",
                    help="the engine overhead's fit set, left out of the held-out figures")
    args = ap.parse_args()
    rows = pd.read_csv(args.folder / "replay.csv")
    rows["ttft_err_async"] = (rows.predicted_ttft_ms + rows.predicted_tpot_ms) / rows.measured_ttft_ms - 1

    def line(name: str, g: pd.DataFrame) -> str:
        now, est = g.ttft_err.abs(), g.ttft_err_async.abs()
        return (f"{name:<28} {len(g):>4}  {now.median():>7.1%} {now.quantile(0.9):>7.1%}   "
                f"{est.median():>7.1%} {est.quantile(0.9):>7.1%}   {g.ttft_err.median():>+7.1%} "
                f"{g.ttft_err_async.median():>+7.1%}")

    print(f"{'|TTFT error|':<28} {'rows':>4}  {'median':>7} {'p90':>7}   {'+1 iter':>7} {'p90':>7}   "
          f"{'signed':>7} {'+1 iter':>7}")
    for model, g in rows.groupby("model"):
        print(line(str(model), g))
    print(line("held out (not the fit set)", rows[rows.model != args.fit_model]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
