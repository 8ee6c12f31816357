"""One run as vLLM's `--save-result` JSON, so scripts written for vLLM's results read layersim's.

Key names and meanings follow `vllm bench serve` (vllm-project/vllm `vllm/benchmarks/serve.py`,
commit 009e6d4a: `result_json` in `main_async`, `result` in `benchmark`), in its order:

* setup: "date" (null: layersim records no wall-clock time, so a re-run is byte-identical),
  "endpoint_type" and "backend" ("layersim"), "label" (the policy), "model_id" (the study's
  model as given), "tokenizer_id" (null: layersim counts tokens without one), "num_prompts",
  "request_rate" (req/s; "inf" for all at once, as vLLM writes it; null when a trace replays its
  own arrivals), "burstiness" (vLLM's gamma shape: 1 for Poisson, 1/cv^2 for gamma, "inf" for
  fixed intervals), "max_concurrency" (the study's; null: open loop);
* totals: "duration" (s, first arrival to last completion), "completed", "failed" (rejected or
  unfinished), "total_input_tokens" and "total_output_tokens" (of completed requests),
  "request_throughput", "request_goodput" (layersim's SLO: TTFT and each request's P99 ITL, and
  TPOT and E2EL when set), "output_throughput", "total_token_throughput";
* per request, in request order (req_id), warm-up requests left out as vLLM leaves them out:
  "input_lens", "output_lens" (0 for a failed request,
  as vLLM counts it), "ttfts" and "latencies" (s; 0 when failed), "itls" (each request's gaps
  between tokens, s; [] when failed), "start_times" (arrival, s from the run's start),
  "queue_times" (vLLM's client-side wait for a --max-concurrency slot: written as 0),
  "generated_texts" (empty strings) and "errors" ("" or why the request never finished:
  rejected, still running when the simulation stopped, or ended short of its max_tokens);
* "max_output_tokens_per_s" (most tokens in one whole second from the first arrival) and
  "max_concurrent_requests" (peak of requests in flight), computed as vLLM computes them,
  "rtfx" (0: no audio);
* mean_/median_/std_/pNN_ of ttft, tpot, itl and e2el in ms, from the run's metrics; a
  fractional percentile is named as vLLM names it ("p99.9_ttft_ms").

Plus "layersim_version" and "workload" (its description), as vLLM's --metadata adds keys.
Per-request ITLs exist only for unstreamed runs (core/records.py); a streamed run is refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from costmodel.files import atomic_write
from sim.results import layersim_version

if TYPE_CHECKING:
    from core.result import SimResult
    from sim.study import Study
    from traces import Workload

UNFINISHED = "not finished when the simulation stopped"
SHORT = "ended before its last token"  # the policy stopped it short (core/records.py)
_LATENCY_KEY = re.compile(r"^(mean|median|std|p[0-9_.]+)_(ttft|tpot|itl|e2el)_ms$")


def _vllm_key(key: str) -> str:
    """layersim's p99_9_ttft_ms is vLLM's p99.9_ttft_ms; other names are the same."""
    stat, _, rest = key.partition("_")
    if stat.startswith("p") and rest[:1].isdigit():  # p99_9_ttft_ms: a fractional percentile
        frac, _, rest = rest.partition("_")
        return f"{stat}.{frac}_{rest}"
    return key


def _burstiness(study: Study) -> float | str:
    if study.arrival == "fixed":
        return "inf"  # vLLM: burstiness inf gives constant intervals
    if study.arrival == "gamma":
        return 1.0 / (study.cv * study.cv)  # vLLM's gamma shape; layersim's cv = 1/sqrt(shape)
    return 1.0


def _error(result: SimResult, row: Any) -> str:
    why = result.rejections.get(int(row.req_id))
    if why is not None:
        return f"rejected: {why}"
    if "max_tokens" in row._fields and math.isfinite(row.finish_s):  # done, but short
        return f"{SHORT}: {row.output_tokens} of {row.max_tokens} tokens"
    return UNFINISHED


def _peaks(start: np.ndarray, ttft: np.ndarray, latency: np.ndarray,
           gaps: list[np.ndarray]) -> tuple[float, int]:
    """vLLM's max_output_tokens_per_s (tokens in whole-second buckets from the first start) and
    max_concurrent_requests (sweep over [start, start + latency), departures first at ties),
    over completed requests."""
    if not len(start):
        return 0.0, 0
    t0 = float(start.min())
    times = np.concatenate([s + t + np.concatenate([[0.0], np.cumsum(g)])
                            for s, t, g in zip(start, ttft, gaps, strict=True)])
    buckets = np.floor(times - t0).astype(np.int64)
    buckets = buckets[buckets >= 0]
    tokens = float(np.bincount(buckets).max()) if len(buckets) else 0.0
    ends = start + latency
    when = np.concatenate([ends, start])
    delta = np.concatenate([-np.ones(len(ends), np.int64), np.ones(len(start), np.int64)])
    order = np.lexsort((delta, when))
    return tokens, int(np.cumsum(delta[order]).max())


def vllm_result(study: Study, result: SimResult, workload: Workload) -> dict[str, Any]:
    """`result` (one policy's run of `study` on `workload`) as vLLM's --save-result JSON object."""
    if result.itls is None:
        raise ValueError("per-request ITLs were not kept (a streamed run): vLLM's result format "
                         "needs an unstreamed simulation")
    req = result.requests
    if "warmup" in req.columns:  # vLLM's warm-up requests are not part of its result either
        req = req[~req["warmup"].to_numpy(dtype=bool)]
    m = result.metrics
    ids = req["req_id"].to_numpy()
    done = req["finished"].to_numpy(dtype=bool)
    arrival = req["arrival_s"].to_numpy(dtype=np.float64)
    ttft = np.where(done, req["ttft_ms"].to_numpy(dtype=np.float64) / 1e3, 0.0)
    latency = np.where(done, req["e2el_ms"].to_numpy(dtype=np.float64) / 1e3, 0.0)
    output = np.where(done, req["output_tokens"].to_numpy(dtype=np.int64), 0)
    gaps = result.itls.per_request(ids.tolist())
    gaps = [g if ok else g[:0] for g, ok in zip(gaps, done, strict=True)]
    errors = [_error(result, row) if not ok else ""
              for row, ok in zip(req.itertuples(index=False), done.tolist(), strict=True)]
    peak_tokens, peak_requests = _peaks(arrival[done], ttft[done], latency[done],
                                        [g for g, ok in zip(gaps, done, strict=True) if ok])
    rate, _ = study.arrivals()
    n = len(req)
    out: dict[str, Any] = {
        "date": None,
        "endpoint_type": "layersim",
        "backend": "layersim",
        "label": result.policy,
        "model_id": study.model,
        "tokenizer_id": None,
        "num_prompts": n,
        "request_rate": None if rate is None else "inf" if math.isinf(rate) else rate,
        "burstiness": _burstiness(study),
        "max_concurrency": getattr(study, "max_concurrency", None),
        "layersim_version": layersim_version(),
        "workload": workload.description,
        "duration": m["duration_s"],
        "completed": m["completed"],
        "failed": n - m["completed"],
        "total_input_tokens": m["total_input_tokens"],
        "total_output_tokens": m["total_output_tokens"],
        "request_throughput": m["request_throughput"],
        "request_goodput": m["request_goodput"],
        "output_throughput": m["output_throughput"],
        "total_token_throughput": m["total_token_throughput"],
        "input_lens": req["prompt_tokens"].astype(int).tolist(),
        "output_lens": output.tolist(),
        "ttfts": ttft.tolist(),
        "itls": [g.tolist() for g in gaps],
        "latencies": latency.tolist(),
        "start_times": arrival.tolist(),
        "queue_times": [0.0] * n,
        "generated_texts": [""] * n,
        "errors": errors,
        "max_output_tokens_per_s": peak_tokens,
        "max_concurrent_requests": peak_requests,
        "rtfx": 0.0,
    }
    out |= {_vllm_key(k): v for k, v in m.items() if _LATENCY_KEY.match(k)}
    return out


def write_vllm_result(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write `doc` as strict JSON (no NaN or Infinity), atomically, as vLLM writes it (one line)."""
    path = Path(path)
    text = json.dumps(doc, allow_nan=False)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
