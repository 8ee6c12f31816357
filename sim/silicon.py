"""Measured serving runs replayed through the simulator, and the engine overhead fitted to them.

Input: a CSV of serving benchmarks in AIConfigurator's `silicon_*.csv` format, one row per run:
`backend`, `model_path` (a Hugging Face id), `precision`, `mode`, `isl`, `osl` (fixed lengths),
`batch_size` (closed-loop clients), `tp_size`, `pp_size`, `attention_dp_size`, `moe_tp_size`,
`moe_ep_size`, and the measured means `silicon_ttft_ms`, `silicon_tpot_ms`.

A supported row becomes a study that replays the runs' protocol, as the public collectors run
it (benchmarks/results/silicon_protocol.md). The rows do not record their collector; `protocol`
names it. `inferencex` (the default) is InferenceX's fixed-sequence-length recipe for vLLM on
H100, as its repository runs it: the older `benchmark_serving.py` copy with `--random-range-ratio
0.8` (lengths uniform in [int(0.8 L), L]), `--num-prompts 10 x clients`, `--request-rate inf
--max-concurrency clients`, and a server with `--max-num-seqs clients`, prefix caching off,
`max-num-batched-tokens 8192` and `async-scheduling`; warm-up requests, where a script sends
them, finish before the measured ones and are not replayed. `vllm-random:R` is vLLM's own `vllm bench serve`
with `--random-range-ratio R` (lengths uniform in [L (1 - R), L (1 + R)]) against vLLM's
defaults. Either way `batch_size` closed-loop clients start together, every request is measured,
and the shipped profile of the GPU prices the plans. The burst start and the length spread
matter: every first wave queues behind ceil(clients * isl / budget) full prefill passes, and
without spread the clients would stay in lockstep for ever. A disaggregated row (`mode`
disagg) runs its pools (sim/disagg.py: `prefill_num_workers` x `prefill_tp_size` and
`decode_num_workers` x `decode_tp_size`, the KV over the GPUs' preset network ports); it records
its client count in `silicon_concurrency` (none of the vLLM ones does: they are skipped, as a
guess such as the decode pools' batch would be far off), `decode_batch_size` sequences per
worker, without async scheduling (a guess: the rows do not say, and vLLM's KV connectors were
still being made to work with it in late 2025), and it is reported as
its model "(disaggregated)". Rows are skipped, each with its reason, when layersim cannot price them
honestly: pipeline or attention data parallelism, expert parallelism inside the
tensor-parallel group, or an architecture with no preset. Nothing here is keyed to particular
rows.

Engine overhead (what a serving engine adds to its kernels per iteration): two parameters,
`iteration_overhead_s` (scheduler, launches) and `request_overhead_s` (per running request:
sampling, detokenising, bookkeeping), fitted by non-negative least squares to the mean TPOT
residual of the rows given for fitting, simulated with no overhead: in steady decoding every
iteration serves about `batch_size` requests, so residual = a + b * batch_size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from costmodel import ConfigError, CostModel
from costmodel.model import hf_preset
from sim.run import run_study
from sim.study import COST_KEYS, Study
from sim.study_file import make_study

COLUMNS = ("backend", "model_path", "precision", "mode", "isl", "osl", "batch_size", "tp_size",
           "silicon_ttft_ms", "silicon_tpot_ms")
PROTOCOL_ROUNDS = 10  # requests per client (the collectors' --num-prompts = 10 x concurrency)
# InferenceX's RANDOM_RANGE_RATIO (.github/workflows/benchmark-tmpl.yml), read by its older
# benchmark_serving.py as lengths uniform in [ratio * L, L]
INFERENCEX_RANGE_RATIO = 0.8
DEFAULT_PROTOCOL = "inferencex"
# vLLM V1's default max_num_batched_tokens for its OpenAI server on GPUs of >= 70 GB, and what
# InferenceX's recipes set
VLLM_CHUNK = 8192
# what a disaggregated row must record to be replayed (its pools)
DISAGG_SIZES = ("prefill_num_workers", "prefill_tp_size", "decode_num_workers", "decode_tp_size",
                "decode_batch_size")


def check_protocol(protocol: str) -> str:
    """`protocol` if it names one (module note), else a one-line error."""
    if protocol == "inferencex":
        return protocol
    if protocol.startswith("vllm-random:"):
        try:
            ratio = float(protocol.removeprefix("vllm-random:"))
        except ValueError:
            ratio = -1.0
        if 0 <= ratio < 1:
            return protocol
    raise ConfigError(f"--protocol: {protocol!r} is not a protocol; valid: inferencex, "
                      "vllm-random:R (R in [0, 1))")


@dataclass(frozen=True)
class Replay:
    row: int  # index in the file
    backend: str
    model: str
    isl: int
    osl: int
    clients: int
    tp: int
    measured_ttft_ms: float
    measured_tpot_ms: float
    predicted_ttft_ms: float | None
    predicted_tpot_ms: float | None
    skipped: str | None  # the reason, for rows not simulated


def read_rows(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a CSV file: {str(e).splitlines()[0]}") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path}: missing columns {missing} (AIConfigurator silicon format)")
    return frame


def _num(row: Any, key: str, default: float = 1.0) -> float:
    value = row.get(key, default)
    return default if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)


def is_disaggregated(row: Any) -> bool:
    return str(row["mode"]) == "disagg"


def skip_reason(row: Any) -> str | None:
    mode = str(row["mode"])
    if mode not in ("agg", "disagg"):
        return f"mode {mode!r} (neither agg nor disagg)"
    pools = ("prefill_", "decode_") if is_disaggregated(row) else ("",)
    for pool in pools:
        if _num(row, pool + "pp_size") > 1:
            return "pipeline parallelism (not modelled)"
        if _num(row, pool + "attention_dp_size") > 1:
            return "attention data parallelism (not modelled)"
        if _num(row, pool + "moe_ep_size") > 1:
            return "expert parallelism inside the TP group (not modelled)"
    if is_disaggregated(row) and any(math.isnan(_num(row, key, math.nan)) for key in DISAGG_SIZES):
        return "disaggregated row without its pools' sizes"
    if row_clients(row) < 1:
        return "no client count recorded (batch_size, silicon_concurrency)"
    preset, _ = hf_preset(str(row["model_path"]))
    if preset is None:
        return "architecture without a preset"
    return None


def row_study(row: Any, gpu: str, profile: str | None, protocol: str = DEFAULT_PROTOCOL,
              **extra: Any) -> Study:
    """The row as a study that replays the runs' protocol (see the module note)."""
    preset, dtype = hf_preset(str(row["model_path"]))
    precision = str(row["precision"]).lower()
    clients, tp, pools = row_clients(row), int(_num(row, "tp_size", 0)), {}
    if is_disaggregated(row):  # the row's pools; the decode batch per worker caps each worker
        tp = int(row["prefill_tp_size"])
        pools = {"prefill_replicas": int(row["prefill_num_workers"]),
                 "decode_replicas": int(row["decode_num_workers"]),
                 "decode_tp": int(row["decode_tp_size"])}
    isl, osl = int(row["isl"]), int(row["osl"])
    server: dict[str, Any]
    if check_protocol(protocol) == "inferencex":
        seqs = int(row["decode_batch_size"]) if pools else clients
        server = {"workload": f"random-legacy:{isl}:{osl}:{INFERENCEX_RANGE_RATIO:g}",
                  "max_num_seqs": seqs, "enable_prefix_caching": False,
                  "async_scheduling": not pools}  # not with a KV connector (module note)
    else:
        server = {"workload": f"random:{isl}:{osl}:{protocol.removeprefix('vllm-random:')}"}
    values: dict[str, Any] = {
        "model": preset, "gpu": gpu, "tp": tp, "profile": profile, **pools,
        "policies": [f"chunked:{VLLM_CHUNK}"],
        "max_concurrency": clients,
        "num_requests": PROTOCOL_ROUNDS * clients,
        "warmup_requests": 0,  # the first wave is measured too (warm-ups, if any, run apart)
        "slo_ttft_ms": 1e9, "slo_itl_ms": 1e9, **server, **extra,
    }
    if precision == "fp8" or dtype == "fp8":
        values["dtype"] = "fp8"
    return make_study(values)


def row_clients(row: Any) -> int:
    """The row's closed-loop clients: `batch_size`, else `silicon_concurrency` (disaggregated
    rows record only that); 0 when neither is recorded."""
    clients = _num(row, "batch_size", math.nan)
    if math.isnan(clients):
        clients = _num(row, "silicon_concurrency", 0.0)
    return int(clients)


def replay(frame: pd.DataFrame, gpu: str = "h100", backend: str | None = None,
           profile: str | None = None, protocol: str = DEFAULT_PROTOCOL) -> list[Replay]:
    """Simulate every supported row (of `backend`, if given); skipped rows keep their reason."""
    check_protocol(protocol)  # also when every row is skipped
    out = []
    done: dict[str, tuple[float | None, float | None, str | None]] = {}  # rows run twice
    models: dict[str, CostModel] = {}
    for idx, row in frame.iterrows():
        if backend is not None and str(row["backend"]) != backend:
            continue
        reason = skip_reason(row)
        ttft = tpot = None
        study: Study | None = None
        if reason is None:
            try:
                study = row_study(row, gpu, profile, protocol)
            except ConfigError as e:  # a size no study takes (tp 0, ...): this row only
                study, reason = None, f"not a study: {e}"
        if study is not None and reason is None:
            key = study.model_dump_json()
            if key not in done:
                try:
                    cost_key = study.model_dump_json(include=COST_KEYS)
                    if cost_key not in models:  # rows of one model, GPU and TP share it
                        models[cost_key] = study.cost_model()
                    _, _, (result,) = run_study(study, cost_model=models[cost_key],
                                                pool_gaps=False)  # it reads two means
                    done[key] = (result.metrics["mean_ttft_ms"], result.metrics["mean_tpot_ms"], None)
                except ConfigError as e:  # e.g. the model does not fit this many GPUs
                    done[key] = (None, None, str(e))
            ttft, tpot, reason = done[key]
        model = str(row["model_path"]) + (" (disaggregated)" if is_disaggregated(row) else "")
        out.append(Replay(int(str(idx)), str(row["backend"]), model,
                          int(_num(row, "isl", 0)), int(_num(row, "osl", 0)), row_clients(row),
                          int(_num(row, "prefill_tp_size" if is_disaggregated(row) else "tp_size", 0)),
                          _num(row, "silicon_ttft_ms", float("nan")),
                          _num(row, "silicon_tpot_ms", float("nan")), ttft, tpot, reason))
    return out


def fit_overhead(replays: Sequence[Replay]) -> tuple[float, float]:
    """(iteration_overhead_s, request_overhead_s) from rows simulated with no overhead."""
    from scipy.optimize import nnls

    rows = [r for r in replays if r.predicted_tpot_ms is not None]
    if len(rows) < 3:
        raise ConfigError(f"fitting the engine overhead needs at least 3 replayed rows, got {len(rows)}")
    design = np.array([[1.0, r.clients] for r in rows])
    residual_s = np.array([(r.measured_tpot_ms - (r.predicted_tpot_ms or 0.0)) / 1e3 for r in rows])
    (a, b), _ = nnls(design, residual_s)
    return float(a), float(b)


def errors(replays: Sequence[Replay]) -> pd.DataFrame:
    """Signed relative errors of the simulated rows."""
    rows = [{"row": r.row, "backend": r.backend, "model": r.model, "isl": r.isl, "osl": r.osl,
             "clients": r.clients, "tp": r.tp, "measured_ttft_ms": r.measured_ttft_ms,
             "predicted_ttft_ms": r.predicted_ttft_ms, "measured_tpot_ms": r.measured_tpot_ms,
             "predicted_tpot_ms": r.predicted_tpot_ms}
            for r in replays if r.skipped is None]
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["ttft_err"] = frame.predicted_ttft_ms / frame.measured_ttft_ms - 1
        frame["tpot_err"] = frame.predicted_tpot_ms / frame.measured_tpot_ms - 1
    return frame


def summary(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """Median and p90 of |error| per group."""
    if not len(frame):
        return pd.DataFrame()
    g = frame.assign(ttft_abs=frame.ttft_err.abs(), tpot_abs=frame.tpot_err.abs()).groupby(by)
    return pd.DataFrame({
        "rows": g.size(),
        "ttft_median": g.ttft_abs.median(), "ttft_p90": g.ttft_abs.quantile(0.9),
        "tpot_median": g.tpot_abs.median(), "tpot_p90": g.tpot_abs.quantile(0.9)})
