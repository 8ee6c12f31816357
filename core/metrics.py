"""Summary metrics with vLLM `benchmark_serving`'s names, plus SLO, goodput, energy and traffic.

Duration is from the first arrival to the last completion (benchmark_serving's wall time).
Warm-up requests (the `warmup` column, sim/clients.py) are left out of every metric: the
duration then starts at the first measured request's arrival (for closed-loop clients, when it
is sent), and `warmup_requests` says how many were left out.
TPOT is per request (E2E - TTFT) / (output tokens - 1); ITL pools every gap between tokens.
Token totals count what finished requests were given: their prompts and the output tokens emitted
(the requests table's `output_tokens`, core/records.py), never the lengths they asked for.
A request meets the SLO when its TTFT and its own P99 ITL are both within target (and its TPOT
and E2E latency, when those targets are set, as benchmark_serving's --goodput sets them); in a
disaggregated run (a `second_token_gap_ms` column) also the gap before its second token, which
holds the KV's move and wait and which a P99 over hundreds of gaps would hide; requests that
never finished count as misses. Each latency has mean, median, std and the
requested percentiles (p90, p95, p99 by default; p99 always). Energy covers busy iterations and
idle power between them.
Prefix caching (`prefix_cache_metrics`): vLLM's `prefix_cache_hit_rate` (hit tokens / queried
tokens; queried = the prompt of every admission, a recompute counted again), the same in
blocks, the token counts behind them and the cached blocks evicted.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from core.blocks import PrefixCacheStats
from core.records import Recorder

DEFAULT_PERCENTILES = (90.0, 95.0, 99.0)
PREFIX_CACHE_KEYS = ("enable_prefix_caching", "prefix_cache_hit_rate", "prefix_cache_queries",
                     "prefix_cache_hits", "prefix_cache_block_hit_rate", "prefix_cache_evictions")


def prefix_cache_metrics(stats: PrefixCacheStats, enabled: bool) -> dict[str, Any]:
    """PREFIX_CACHE_KEYS from a run's pool counts (zeros with caching off)."""
    return {"enable_prefix_caching": enabled,
            "prefix_cache_hit_rate": stats.hit_rate,
            "prefix_cache_queries": stats.queried_tokens,
            "prefix_cache_hits": stats.hit_tokens,
            "prefix_cache_block_hit_rate": (stats.hit_blocks / stats.queried_blocks
                                            if stats.queried_blocks else 0.0),
            "prefix_cache_evictions": stats.num_evictions}


def _name(p: float) -> str:
    return f"p{p:g}"  # benchmark_serving's p99, p99.9


def _stats(prefix: str, values: np.ndarray, percentiles: tuple[float, ...],
           scratch: bool = False) -> dict[str, float]:
    """mean, median, std and the percentiles, as benchmark_serving names them. `scratch`: the
    caller gives up `values`, so the order statistics may reorder it in place rather than copy
    (every gap of a long run: hundreds of MB), after the order-dependent sums are taken."""
    if not len(values):
        nan = float("nan")
        return {f"mean_{prefix}": nan, f"median_{prefix}": nan, f"std_{prefix}": nan,
                **{f"{_name(p)}_{prefix}": nan for p in percentiles}}
    mean, std = float(np.mean(values)), float(np.std(values))
    pct = np.percentile(values, percentiles, overwrite_input=scratch) if percentiles else []
    median = float(np.median(values, overwrite_input=scratch))
    return {f"mean_{prefix}": mean, f"median_{prefix}": median, f"std_{prefix}": std,
            **{f"{_name(p)}_{prefix}": float(v) for p, v in zip(percentiles, pct, strict=True)}}


def summarize(req: pd.DataFrame, rec: Recorder, *, end_s: float,
              idle_energy_j: float, slo_ttft_ms: float, slo_itl_ms: float,
              slo_tpot_ms: float | None = None, slo_e2el_ms: float | None = None,
              percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict[str, Any]:
    pcts = tuple(sorted({*percentiles, 99.0}))  # p99 always: the SLO and the tables use it
    warm = req["warmup"].to_numpy(dtype=bool) if "warmup" in req else np.zeros(len(req), bool)
    req = req[~warm]
    done = req[req["finished"]]
    start_s = float(req["arrival_s"].min()) if len(req) else 0.0
    duration = max(end_s - start_s, 1e-12)
    prompt_tokens = int(done["prompt_tokens"].sum())
    output_tokens = int(done["output_tokens"].sum())
    energy = rec.energy_j + idle_energy_j
    meets = (done["ttft_ms"] <= slo_ttft_ms) & (done["p99_itl_ms"] <= slo_itl_ms)
    if slo_tpot_ms is not None:  # a one-token request has no TPOT: it cannot miss that target
        meets &= (done["output_tokens"] <= 1) | (done["tpot_ms"] <= slo_tpot_ms)
    if slo_e2el_ms is not None:
        meets &= done["e2el_ms"] <= slo_e2el_ms
    if "second_token_gap_ms" in done:  # disaggregated: a request's P99 over its gaps would hide
        meets &= ~(done["second_token_gap_ms"] > slo_itl_ms)  # the KV's wait (NaN: one token)
    ok = done[meets]
    n = len(done)
    out: dict[str, Any] = {
        "completed": n,
        "num_requests": len(req),
        "unfinished": int(len(req) - n),
        "warmup_requests": int(warm.sum()),
        "duration_s": duration,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": n / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
    }
    out |= _stats("ttft_ms", done["ttft_ms"].to_numpy(), pcts)
    tpot = done.loc[done["output_tokens"] > 1, "tpot_ms"].to_numpy()
    out |= _stats("tpot_ms", tpot, pcts)
    if rec.itl_hist is None:
        itl_ms = np.sort(rec.itl_values_s())  # sorted: order-free sums
        itl_ms *= 1e3  # in place: x -> 1e3 x keeps the order
        out |= _stats("itl_ms", itl_ms, pcts, scratch=True)
    else:  # fleet runs keep gaps as a histogram: no mean or std, percentiles from its bins
        values = rec.itl_percentiles_ms((50, *pcts))
        out |= {"mean_itl_ms": float("nan"), "std_itl_ms": float("nan"), "median_itl_ms": values[0],
                **{f"{_name(p)}_itl_ms": v for p, v in zip(pcts, values[1:], strict=True)}}
    out |= _stats("e2el_ms", done["e2el_ms"].to_numpy(), pcts)
    expert_bytes = rec.expert_bytes
    hbm_bytes = rec.hbm_bytes
    out |= {
        "slo_ttft_ms": slo_ttft_ms,
        "slo_itl_ms": slo_itl_ms,
        "slo_tpot_ms": slo_tpot_ms if slo_tpot_ms is not None else float("nan"),
        "slo_e2el_ms": slo_e2el_ms if slo_e2el_ms is not None else float("nan"),
        "slo_attainment": len(ok) / len(req) if len(req) else float("nan"),
        "goodput": len(ok) / duration,
        "request_goodput": len(ok) / duration,  # benchmark_serving's name for the same
        "energy_j": energy,
        "energy_per_token_j": energy / (prompt_tokens + output_tokens) if n else float("nan"),
        "energy_per_output_token_j": energy / output_tokens if output_tokens else float("nan"),
        "expert_bytes_per_request": expert_bytes / n if n else float("nan"),
        "hbm_bytes_per_request": hbm_bytes / n if n else float("nan"),
        "preemptions": rec.preemptions,
        "iterations": rec.num_iterations,
    }
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
