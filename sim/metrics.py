"""Summary metrics with vLLM `benchmark_serving`'s names, plus SLO, goodput, energy and traffic.

Duration is from the first arrival to the last completion (benchmark_serving's wall time).
TPOT is per request (E2E - TTFT) / (output tokens - 1); ITL pools every gap between tokens.
A request meets the SLO when its TTFT and its own P99 ITL are both within target; requests that
never finished count as misses. Energy covers busy iterations and idle power between them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from sim.records import Recorder


def _stats(prefix: str, values: np.ndarray) -> dict[str, float]:
    if not len(values):
        nan = float("nan")
        return {f"mean_{prefix}": nan, f"median_{prefix}": nan, f"p99_{prefix}": nan}
    return {f"mean_{prefix}": float(np.mean(values)), f"median_{prefix}": float(np.median(values)),
            f"p99_{prefix}": float(np.percentile(values, 99))}


def summarize(req: pd.DataFrame, rec: Recorder, *, end_s: float,
              idle_energy_j: float, slo_ttft_ms: float, slo_itl_ms: float) -> dict[str, Any]:
    done = req[req["finished"]]
    start_s = float(req["arrival_s"].min()) if len(req) else 0.0
    duration = max(end_s - start_s, 1e-12)
    prompt_tokens = int(done["prompt_tokens"].sum())
    output_tokens = int(done["output_tokens"].sum())
    energy = rec.energy_j + idle_energy_j
    ok = done[(done["ttft_ms"] <= slo_ttft_ms) & (done["p99_itl_ms"] <= slo_itl_ms)]
    n = len(done)
    out: dict[str, Any] = {
        "completed": n,
        "num_requests": len(req),
        "unfinished": int(len(req) - n),
        "duration_s": duration,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": n / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
    }
    out |= _stats("ttft_ms", done["ttft_ms"].to_numpy())
    tpot = done.loc[done["output_tokens"] > 1, "tpot_ms"].to_numpy()
    out |= _stats("tpot_ms", tpot)
    if rec.itl_hist is None:
        out |= _stats("itl_ms", np.sort(rec.itl_values_s()) * 1e3)  # sorted: order-free sums
    else:
        med, p99 = rec.itl_percentiles_ms((50, 99))
        out |= {"mean_itl_ms": float("nan"), "median_itl_ms": med, "p99_itl_ms": p99}
    out |= _stats("e2el_ms", done["e2el_ms"].to_numpy())
    expert_bytes = rec.expert_bytes
    hbm_bytes = rec.hbm_bytes
    out |= {
        "slo_ttft_ms": slo_ttft_ms,
        "slo_itl_ms": slo_itl_ms,
        "slo_attainment": len(ok) / len(req) if len(req) else float("nan"),
        "goodput": len(ok) / duration,
        "energy_j": energy,
        "energy_per_token_j": energy / (prompt_tokens + output_tokens) if n else float("nan"),
        "energy_per_output_token_j": energy / output_tokens if output_tokens else float("nan"),
        "expert_bytes_per_request": expert_bytes / n if n else float("nan"),
        "hbm_bytes_per_request": hbm_bytes / n if n else float("nan"),
        "preemptions": rec.preemptions,
        "iterations": rec.num_iterations,
    }
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
