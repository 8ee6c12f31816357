"""What a run records: one row per finished request, one row per iteration (or per fast-forwarded
run of identical decode iterations, with its count), and every inter-token gap.

Rows are plain tuples (cheap to append) that become pandas DataFrames at the end; inter-token
gaps go to a flat float array, 8 bytes per output token. With `stream_dir` set, request and
iteration rows spill to parquet parts every `flush_rows` rows and gaps are binned in batches
into a log-spaced histogram, so memory stays bounded for huge runs; the metrics come from
running totals, never from re-reading the iteration parts.

Unstreamed runs also index each finished request's gaps in the flat array ((req_id, start,
count), 24 bytes a request), so `request_gaps` gives every request its own inter-token gaps
without copying them (vLLM's per-request `itls`, sim/vllm_result.py); streamed runs keep none.
A run that reads no pooled gap (`pool_gaps=False`: a replay of measured runs reads mean TTFT
and TPOT) keeps neither: its pooled ITL metrics are unset (None), and each request's own P99
and largest gap are recorded as always.

What the columns count: `prompt_tokens` is the prompt as it arrived and `max_tokens` the output
length it asked for; `output_tokens` is what was emitted (a policy that ends a request early
shows here, and the request is not `finished`). In the iteration table `prefill_tokens` counts
each prompt token once, when it enters the stack at layer 0 (a layered prefill passes a prompt
through several iterations; a recomputed prompt counts again), and `prefill_layer_tokens` the
prompt work done: tokens times the layers they passed. A prompt's last token run alone (a
1-token final chunk, a full prefix hit's recompute) is priced as a decode by the cost model and
booked here as prefill (`Recorder.rebooked`); `decode_tokens` counts output tokens only.

Warm-up (sim/clients.py): requests in `warmup_ids` get their row, marked `warmup`, but their
gaps and preemptions are not pooled; the running totals (energy, bytes, iterations, busy time)
count only iterations that start at or after `count_from_s`, when the measured window opens
(None: every iteration).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core.request import RequestState
from costmodel.coefficients import FEATURES
from costmodel.files import atomic_write

if TYPE_CHECKING:
    from costmodel.price import IterationCost

REQUEST_COLUMNS = ("req_id", "replica", "arrival_s", "prompt_tokens", "max_tokens",
                   "output_tokens", "first_token_s", "finish_s", "ttft_ms", "tpot_ms", "e2el_ms",
                   "p99_itl_ms", "max_itl_ms", "preemptions", "finished", "warmup")
ITERATION_COLUMNS = ("replica", "start_s", "latency_s", "iterations", "prefill_tokens",
                     "decode_tokens", "num_tiles", "prefill_layer_tokens", "energy_j", "flops",
                     "expert_bytes", "hbm_bytes", "kv_read_bytes")
# a request that never ran: first_token_s .. max_itl_ms
_NO_TIMES = (float("nan"),) * (REQUEST_COLUMNS.index("max_itl_ms") + 1
                               - REQUEST_COLUMNS.index("first_token_s"))
_EMBED = FEATURES.index("embed")  # tokens through the embedding, per expert-parallel group
# Histogram of gaps for streamed runs: 1 us .. 1000 s, 0.5% wide bins.
_HIST_EDGES = np.geomspace(1e-6, 1e3, int(np.log(1e9) / np.log(1.005)) + 1)


class Table:
    """Rows (plain tuples, the cheapest thing to append) that spill to numbered parquet parts
    when a stream folder is given."""

    def __init__(self, name: str, columns: tuple[str, ...], ints: tuple[str, ...],
                 stream_dir: Path | None, flush_rows: int) -> None:
        self.name, self.columns, self.ints = name, columns, ints
        self.stream_dir, self.flush_rows = stream_dir, flush_rows
        self.parts: list[Path] = []
        self._reset()

    def _reset(self) -> None:
        self.rows: list[tuple[float, ...]] = []

    def append(self, values: tuple[float, ...]) -> None:
        self.rows.append(values)
        if self.stream_dir is not None and len(self.rows) >= self.flush_rows:
            self.flush()

    def frame(self) -> pd.DataFrame:
        if not self.rows:  # typed columns even when empty, so parts concatenate cleanly
            return pd.DataFrame({c: np.zeros(0, dtype="int64" if c in self.ints else "float64")
                                 for c in self.columns})
        # Column by column from the transposed rows (C loops): int columns as int64, the others
        # as numpy infers them (float64; bool for flags), as pandas' row inference would.
        return pd.DataFrame({c: np.array(values, dtype="int64" if c in self.ints else None)
                             for c, values in zip(self.columns, zip(*self.rows, strict=True), strict=True)})

    def flush(self) -> None:
        if self.stream_dir is None or not self.rows:
            return
        path = self.stream_dir / f"{self.name}-part{len(self.parts):05d}.parquet"
        frame = self.frame()
        atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
        self.parts.append(path)
        self._reset()

    def read_all(self) -> pd.DataFrame:
        frames = [pd.read_parquet(p) for p in self.parts]
        if self.rows or not frames:
            frames.append(self.frame())
        return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


@dataclass(frozen=True, eq=False)
class RequestGaps:
    """Each finished request's inter-token gaps, in seconds: slices of one array."""

    values: np.ndarray  # every gap, one request's after another's
    index: np.ndarray  # (req_id, start, count) rows, int64

    def per_request(self, req_ids: Sequence[int]) -> list[np.ndarray]:
        """The gaps of each request in `req_ids` (empty for one that never finished)."""
        spans = {int(r): (int(a), int(n)) for r, a, n in self.index}
        out = []
        for rid in req_ids:
            start, count = spans.get(int(rid), (0, 0))
            out.append(self.values[start:start + count])
        return out


class Recorder:
    def __init__(self, num_layers: int, stream_dir: Path | None = None, flush_rows: int = 200_000,
                 pool_gaps: bool = True):
        self.num_layers = num_layers
        self.requests = Table("requests", REQUEST_COLUMNS,
                              ("req_id", "replica", "prompt_tokens", "max_tokens", "output_tokens",
                               "preemptions"),
                              stream_dir, flush_rows)
        self.iterations = Table("iterations", ITERATION_COLUMNS,
                                ("replica", "iterations", "prefill_tokens", "decode_tokens",
                                 "num_tiles", "prefill_layer_tokens"), stream_dir, flush_rows)
        self.itl = array("d")
        self.preemptions = 0
        self.stream_dir = stream_dir
        self.itl_hist = np.zeros(len(_HIST_EDGES) + 1, dtype=np.int64) if stream_dir else None
        self.itl_index = (None if stream_dir or not pool_gaps
                          else array("q"))  # (req_id, start, count) per request
        self.pool_gaps = pool_gaps
        self.num_requests_recorded = 0
        self.recorded_ids: set[int] = set()
        self.on_record: Callable[[], object] | None = None
        self.warmup_ids: set[int] = set()
        self.count_from_s: float | None = None
        self.busy_s: dict[int, float] = {}  # replica -> busy seconds in the measured window
        # running totals, so metrics never need the (possibly streamed) iteration table
        self.energy_j = self.expert_bytes = self.hbm_bytes = 0.0
        self.num_iterations = 0

    # ---- events -----------------------------------------------------------------------------
    def iteration(self, replica: int, start_s: float, cost: IterationCost, num_tiles: int,
                  iterations: int, prompt_tokens_as_decodes: int = 0) -> None:
        """A priced iteration (the simulator's): every figure from its cost, the prompt tokens
        it priced as decodes moved (`iteration_row`)."""
        hb = cost.hbm_bytes
        n = prompt_tokens_as_decodes
        self.iteration_row(replica=replica, start_s=start_s, latency_s=cost.latency_s,
                           iterations=iterations, prefill_tokens=prefill_tokens_once(cost) + n,
                           decode_tokens=cost.decode_tokens - n, num_tiles=num_tiles,
                           prefill_layer_tokens=cost.prefill_layer_tokens + n * self.num_layers,
                           energy_j=cost.energy_j, flops=cost.flops,
                           expert_bytes=hb.expert_weights, hbm_bytes=hb.total,
                           kv_read_bytes=hb.kv_read)

    def rebooked(self, row: dict[str, Any], prompt_tokens_as_decodes: int) -> dict[str, Any]:
        """`iteration_row`'s arguments with the prompt tokens a cost model priced as decodes
        (ReplicaState.prompt_tokens_as_decodes after the commit: prompts' last tokens run alone
        through the whole stack with logits, the same work as a decode) moved to the prefill
        columns, so that `prefill_tokens` counts every prompt token and `decode_tokens` only
        output tokens. `iteration` does this itself; an executor passing its own row calls it."""
        n = prompt_tokens_as_decodes
        if not n:
            return row
        return {**row, "prefill_tokens": row["prefill_tokens"] + n,
                "decode_tokens": row["decode_tokens"] - n,
                "prefill_layer_tokens": row["prefill_layer_tokens"] + n * self.num_layers}

    def steady(self, replica: int, start_s: float, latency_s: float, steps: int, batch: int,
               first: IterationCost, last: IterationCost, frac: float,
               busy_power_w: float | None = None) -> None:
        """`steps` decode iterations whose figures run affinely from `first` towards `last`;
        with `busy_power_w`, their latencies did not (each was priced) and add up to
        `latency_s`: energy is that power times `latency_s` plus the affine rest."""
        def total(a: float, b: float) -> float:
            return steps * (a + (a + frac * (b - a))) / 2

        if busy_power_w is None:
            energy = total(first.energy_j, last.energy_j)
        else:
            p = busy_power_w
            energy = p * latency_s + total(first.energy_j - p * first.latency_s,
                                           last.energy_j - p * last.latency_s)
        self.iteration_row(
            replica=replica, start_s=start_s, latency_s=latency_s, iterations=steps,
            prefill_tokens=0, decode_tokens=steps * batch, num_tiles=batch, prefill_layer_tokens=0,
            energy_j=energy, flops=total(first.flops, last.flops),
            expert_bytes=total(first.hbm_bytes.expert_weights, last.hbm_bytes.expert_weights),
            hbm_bytes=total(first.hbm_bytes.total, last.hbm_bytes.total),
            kv_read_bytes=total(first.hbm_bytes.kv_read, last.hbm_bytes.kv_read))

    def iteration_row(self, *, replica: int, start_s: float, latency_s: float, iterations: int,
                      prefill_tokens: int, decode_tokens: int, num_tiles: int,
                      prefill_layer_tokens: int, energy_j: float, flops: float,
                      expert_bytes: float, hbm_bytes: float, kv_read_bytes: float) -> None:
        """One row of ITERATION_COLUMNS (the parameters, in that order): an executed iteration
        (the engine's, measured), a priced one or a fast-forwarded run of `iterations`. Token
        counts taken from a cost model's count of a plan go through `rebooked` first."""
        self.iterations.append((replica, start_s, latency_s, iterations, prefill_tokens,
                                decode_tokens, num_tiles, prefill_layer_tokens, energy_j, flops,
                                expert_bytes, hbm_bytes, kv_read_bytes))
        if self.count_from_s is not None and start_s < self.count_from_s:
            return  # before the measured window (warm-up)
        self.busy_s[replica] = self.busy_s.get(replica, 0.0) + latency_s
        self.num_iterations += iterations
        self.energy_j += energy_j
        self.expert_bytes += expert_bytes
        self.hbm_bytes += hbm_bytes

    def preempted(self, req: RequestState) -> None:
        if req.req_id not in self.warmup_ids:
            self.preemptions += 1

    def finished(self, req: RequestState, replica: int = -1) -> None:
        gaps = req.itl_s
        if self.pool_gaps and req.req_id not in self.warmup_ids:  # a warm-up's are not pooled
            if self.itl_index is not None:
                self.itl_index.extend((req.req_id, len(self.itl), len(gaps)))
            self.itl.extend(gaps)
            if self.itl_hist is not None and len(self.itl) >= 1 << 20:
                self._bin_gaps()
        if gaps:
            p99, max_itl = _p99_and_max(gaps, scratch=True)  # pooled already; dropped below
            p99 *= 1e3
            max_itl *= 1e3
        else:
            p99 = max_itl = 0.0
        first = req.first_token_s if req.first_token_s is not None else float("nan")
        finish = req.finish_s if req.finish_s is not None else float("nan")
        out = _emitted(req)
        ttft = (first - req.arrival_s) * 1e3
        e2e = (finish - req.arrival_s) * 1e3
        tpot = (e2e - ttft) / (out - 1) if out > 1 else 0.0
        self._req_row(req, replica, (first, finish, ttft, tpot, e2e, p99, max_itl),
                      req.is_finished and out >= req.output_len)
        req.itl_s = array("d")

    def rejected(self, req: RequestState, now_s: float, replica: int = -1) -> None:
        self._req_row(req, replica, _NO_TIMES, False)

    def _req_row(self, req: RequestState, replica: int, times: tuple[float, ...],
                 finished: bool) -> None:
        """A row of REQUEST_COLUMNS; `times` from first_token_s to max_itl_ms."""
        self.requests.append((req.req_id, replica, req.arrival_s, req.prompt_len, req.output_len,
                              _emitted(req), *times, req.num_preemptions, finished,
                              req.req_id in self.warmup_ids))
        self.recorded_ids.add(int(req.req_id))
        self.num_requests_recorded += 1
        if self.on_record is not None:
            self.on_record()

    def flush(self) -> None:
        self.requests.flush()
        self.iterations.flush()
        self._bin_gaps()

    def absorb(self, other: Recorder) -> None:
        """Fold another shard's records into this one (replicas are disjoint)."""
        for mine, theirs in ((self.requests, other.requests), (self.iterations, other.iterations)):
            mine.parts.extend(theirs.parts)
            mine.rows.extend(theirs.rows)
        if self.itl_index is not None and other.itl_index is not None:
            index = np.frombuffer(other.itl_index, dtype=np.int64).reshape(-1, 3).copy()
            index[:, 1] += len(self.itl)  # their gaps land after mine
            self.itl_index.frombytes(index.tobytes())
        self.itl.extend(other.itl)
        if self.itl_hist is not None and other.itl_hist is not None:
            self.itl_hist += other.itl_hist
            self._bin_gaps()
        self.preemptions += other.preemptions
        self.num_requests_recorded += other.num_requests_recorded
        self.recorded_ids |= other.recorded_ids
        self.energy_j += other.energy_j
        self.expert_bytes += other.expert_bytes
        self.hbm_bytes += other.hbm_bytes
        self.num_iterations += other.num_iterations
        self.busy_s.update(other.busy_s)  # replicas are disjoint

    # ---- results ----------------------------------------------------------------------------
    def requests_frame(self) -> pd.DataFrame:
        df = self.requests.read_all()
        df["finished"] = df["finished"].astype(bool)
        df["warmup"] = df["warmup"].astype(bool)
        return df.sort_values("req_id", kind="stable").reset_index(drop=True)

    def iterations_frame(self) -> pd.DataFrame:
        """Every iteration row; for streamed runs only the rows not yet spilled (see parts)."""
        return self.iterations.frame() if self.stream_dir else self.iterations.read_all()

    def _bin_gaps(self) -> None:
        """Streaming runs keep gaps in a histogram; bin the pending ones (in batches: cheap)."""
        if self.itl_hist is not None and len(self.itl):
            idx = np.searchsorted(_HIST_EDGES, np.frombuffer(self.itl, dtype=np.float64))
            self.itl_hist += np.bincount(idx, minlength=len(self.itl_hist))
            self.itl = array("d")

    def request_gaps(self) -> RequestGaps | None:
        """Every finished request's gaps (None for a streamed run). The result views this
        recorder's array, which then cannot grow: call it once recording is over."""
        if self.itl_index is None:
            return None
        return RequestGaps(self.itl_values_s(),
                           np.frombuffer(self.itl_index, dtype=np.int64).reshape(-1, 3))

    def itl_values_s(self) -> np.ndarray:
        return np.frombuffer(self.itl, dtype=np.float64) if len(self.itl) else np.zeros(0)

    def itl_percentiles_ms(self, qs: tuple[float, ...]) -> tuple[float, ...]:
        """Percentiles of every gap: exact from the array, or from the histogram when streaming."""
        if self.itl_hist is None:
            v = self.itl_values_s()
            if not len(v):
                return tuple(float("nan") for _ in qs)
            return tuple(float(np.percentile(v, q)) * 1e3 for q in qs)
        self._bin_gaps()
        cum = np.cumsum(self.itl_hist)
        if not cum[-1]:
            return tuple(float("nan") for _ in qs)
        centers = np.concatenate([[_HIST_EDGES[0]], np.sqrt(_HIST_EDGES[1:] * _HIST_EDGES[:-1]),
                                  [_HIST_EDGES[-1]]])
        out = []
        for q in qs:
            i = int(np.searchsorted(cum, q / 100 * cum[-1]))
            out.append(float(centers[min(i, len(centers) - 1)]) * 1e3)
        return tuple(out)



def _emitted(req: RequestState) -> int:
    """Output tokens emitted: the first, then one gap before each later one (preemption keeps
    them); counted from the token times, not from fields a policy could have changed."""
    return (req.first_token_s is not None) + len(req.itl_s)


def prefill_tokens_once(cost: IterationCost) -> int:
    """Prompt tokens entering the stack in this iteration: the cost model's embedded tokens less
    its decodes. A cost without the feature vector (a test double) gives its own count."""
    model, x, *_ = cost.detail
    if model is None or len(x) <= _EMBED:
        return int(cost.prefill_tokens)
    return round(x[_EMBED] * model.parallel.ep) - int(cost.decode_tokens)


def _p99_and_max(values: Sequence[float], scratch: bool = False) -> tuple[float, float]:
    """numpy's default (linear) 99th percentile, and the largest value, without numpy's per-call
    overhead for short lists or a full sort of long ones: this runs once per finished request.
    The percentile interpolates between sorted positions lo and lo + 1 of pos = (n - 1) * 0.99;
    a partial sort (np.partition) puts both in place. (Token gaps mostly grow with the context,
    so a sort of a short list is nearly linear, and a heap selection is not.) `scratch`: the
    caller gives up `values` (an array("d")), so it is reordered in place rather than copied."""
    n = len(values)
    pos = (n - 1) * 99.0 / 100
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    if n <= 64:
        v = sorted(values)
        return v[lo] + (v[hi] - v[lo]) * (pos - lo), v[-1]
    arr = np.frombuffer(values, dtype=np.float64) if isinstance(values, array) else np.asarray(values)
    # the largest in the same partition (the last place), not another pass: arr.max()'s value
    kth = (lo, hi) if hi == n - 1 else (lo, hi, n - 1)
    if scratch and isinstance(values, array):
        arr.partition(kth)
        part = arr
    else:
        part = np.partition(arr, kth)
    v_lo, v_hi = float(part[lo]), float(part[hi])
    return v_lo + (v_hi - v_lo) * (pos - lo), float(part[n - 1])
