"""Loaders for real request traces and length statistics.

Formats (one loader each, ``load_trace`` sniffs the header / extension and dispatches):

* Azure LLM inference 2023/2024 CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens``; absolute
  ISO timestamps with up to 7 fractional digits (2024 adds a ``+00:00`` offset), parsed in one
  vectorised pandas call; rows may be slightly out of order and are sorted (stable).
* BurstGPT CSV: ``Timestamp`` (s), ``Request tokens``, ``Response tokens`` (other columns ignored).
* Mooncake JSONL: one object per line, ``timestamp`` (ms), ``input_length``, ``output_length``,
  optional ``hash_ids`` (list of ints, validated but not kept).
* Length-statistics CSV: ``num_prefill_tokens,num_decode_tokens,...`` with no arrival times.
* vLLM's ShareGPT JSON (a list of conversations): sniffed here, read by
  ``traces.vllm_datasets.load_sharegpt`` (``resolve_workload`` dispatches).

Traces with arrival times become ``LoadedTrace``: arrivals in seconds relative to the first kept
request, sorted, ``req_id`` 0..n-1 in arrival order. Rows with zero prompt or zero output tokens
are skipped and counted; any malformed row raises ``TraceError`` naming ``file:line``. BurstGPT
and Mooncake timestamps must be non-decreasing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from traces._table import (
    check_exists,
    check_monotone,
    float_column,
    int_column,
    read_csv_table,
)
from traces.errors import TraceError
from traces.request import Request
from traces.vllm_datasets import ShareGPTLengths, load_sharegpt

PathLike = str | os.PathLike[str]

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
LENGTH_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")


@dataclass(frozen=True)
class LoadedTrace:
    """Requests of a real trace, arrivals relative to the first one (which is at 0.0 s)."""

    requests: tuple[Request, ...]
    skipped_zero: int
    source: str


@dataclass(frozen=True, eq=False)
class LengthTable:
    """(prompt, output) length pairs without arrival times; arrays are read-only int64."""

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    skipped_zero: int
    source: str

    def __len__(self) -> int:
        return int(self.prompt_tokens.shape[0])


def requests_from_arrays(
    times_s: np.ndarray, prompt: np.ndarray, output: np.ndarray
) -> tuple[Request, ...]:
    """Requests numbered 0..n-1 from parallel arrays (already in arrival order)."""
    rows = zip(times_s.tolist(), prompt.tolist(), output.tolist(), strict=True)
    return tuple(
        Request(req_id=i, arrival_s=float(t), prompt_tokens=int(p), output_tokens=int(o))
        for i, (t, p, o) in enumerate(rows)
    )


def _build_trace(
    name: str, times_s: np.ndarray, prompt: np.ndarray, output: np.ndarray, source: str
) -> LoadedTrace:
    """Drop zero-token rows, sort by time (stable), shift to 0 and number the requests."""
    keep = (prompt > 0) & (output > 0)
    skipped = int(np.count_nonzero(~keep))
    times_s, prompt, output = times_s[keep], prompt[keep], output[keep]
    if not len(times_s):
        raise TraceError(f"{name}: no requests left ({skipped} zero-token rows skipped)")
    order = np.argsort(times_s, kind="stable")
    rel = times_s[order] - times_s[order[0]]
    requests = requests_from_arrays(rel, prompt[order], output[order])
    return LoadedTrace(requests=requests, skipped_zero=skipped, source=source)


def load_azure(path: PathLike) -> LoadedTrace:
    """Load an Azure 2023/2024 LLM inference trace (CSV with absolute timestamps)."""
    p = Path(path)
    table = read_csv_table(p, AZURE_COLUMNS)
    raw = table.frame["TIMESTAMP"].str.strip()
    stamps = pd.to_datetime(raw, format="ISO8601", utc=True, errors="coerce")
    bad = stamps.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        cell = str(table.frame["TIMESTAMP"].iloc[row])
        what = (
            "missing TIMESTAMP" if not cell.strip() else f"TIMESTAMP is not a timestamp: {cell!r}"
        )
        raise TraceError(f"{table.name}:{table.line_of(row)}: {what}")
    prompt = int_column(table, "ContextTokens")
    output = int_column(table, "GeneratedTokens")
    seconds = (stamps - stamps.min()).dt.total_seconds().to_numpy(dtype=np.float64)
    return _build_trace(table.name, seconds, prompt, output, f"Azure trace {table.name}")


def load_burstgpt(path: PathLike) -> LoadedTrace:
    """Load a BurstGPT CSV (relative timestamps in seconds; zero-token failed calls skipped)."""
    p = Path(path)
    table = read_csv_table(p, BURSTGPT_COLUMNS)
    times = float_column(table, "Timestamp")
    prompt = int_column(table, "Request tokens")
    output = int_column(table, "Response tokens")
    check_monotone(table.name, times, table.lines, "Timestamp")
    return _build_trace(table.name, times, prompt, output, f"BurstGPT trace {table.name}")


def _json_count(name: str, line: int, obj: dict[str, object], key: str) -> int:
    value = obj.get(key)
    if value is None:
        raise TraceError(f"{name}:{line}: missing {key}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TraceError(f"{name}:{line}: {key} is not an integer: {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise TraceError(f"{name}:{line}: {key} is not an integer: {value!r}")
    if value < 0:
        raise TraceError(f"{name}:{line}: {key} is negative: {value!r}")
    return int(value)


def load_mooncake(path: PathLike) -> LoadedTrace:
    """Load a Mooncake JSONL trace (``timestamp`` in ms, relative)."""
    p = Path(path)
    check_exists(p)
    name = p.name
    times: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    last = -math.inf
    try:
        with p.open(encoding="utf-8-sig") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{name}:{line_no}: invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise TraceError(f"{name}:{line_no}: expected a JSON object")
                stamp = obj.get("timestamp")
                if stamp is None:
                    raise TraceError(f"{name}:{line_no}: missing timestamp")
                if (isinstance(stamp, bool) or not isinstance(stamp, (int, float))
                        or not math.isfinite(stamp)):
                    raise TraceError(f"{name}:{line_no}: timestamp is not a number: {stamp!r}")
                if stamp < last:
                    raise TraceError(
                        f"{name}:{line_no}: timestamp goes backwards ({stamp} after {last})"
                    )
                last = stamp
                hash_ids = obj.get("hash_ids", [])
                if not isinstance(hash_ids, list) or not all(
                    isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
                ):
                    raise TraceError(f"{name}:{line_no}: hash_ids is not a list of integers")
                prompt.append(_json_count(name, line_no, obj, "input_length"))
                output.append(_json_count(name, line_no, obj, "output_length"))
                times.append(float(stamp) / 1000.0)
    except UnicodeDecodeError as exc:
        raise TraceError(f"{name}: not UTF-8 text ({exc.reason})") from None
    if not times:
        raise TraceError(f"{name}: no data rows")
    return _build_trace(
        name,
        np.asarray(times, dtype=np.float64),
        np.asarray(prompt, dtype=np.int64),
        np.asarray(output, dtype=np.int64),
        f"Mooncake trace {name}",
    )


def load_length_stats(path: PathLike) -> LengthTable:
    """Load a length-statistics CSV (Sarathi-Serve / Vidur style) into a ``LengthTable``."""
    p = Path(path)
    table = read_csv_table(p, LENGTH_COLUMNS)
    prompt = int_column(table, "num_prefill_tokens")
    output = int_column(table, "num_decode_tokens")
    keep = (prompt > 0) & (output > 0)
    skipped = int(np.count_nonzero(~keep))
    prompt, output = prompt[keep].copy(), output[keep].copy()
    if not len(prompt):
        raise TraceError(f"{table.name}: no rows left ({skipped} zero-token rows skipped)")
    prompt.setflags(write=False)
    output.setflags(write=False)
    return LengthTable(
        prompt_tokens=prompt,
        output_tokens=output,
        skipped_zero=skipped,
        source=f"length statistics {table.name}",
    )


def _mooncake_line(line: str) -> bool:
    """Whether `line` is a whole JSON object with a timestamp (a Mooncake row)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "timestamp" in obj


def sniff_format(path: PathLike) -> str:
    """Return 'azure', 'burstgpt', 'mooncake', 'length-stats' or 'sharegpt-json' (a JSON list,
    or a .json file not made of Mooncake rows; traces/vllm_datasets.py reads it) from the
    extension / header."""
    p = Path(path)
    check_exists(p)
    try:
        with p.open(encoding="utf-8-sig") as fh:
            head = fh.read(1 << 16)  # not the whole first line: a JSON file may be one line
    except UnicodeDecodeError as exc:
        raise TraceError(f"{p.name}: not UTF-8 text ({exc.reason})") from None
    first = next((line.strip() for line in head.splitlines() if line.strip()), "")
    if first.startswith("[") or (p.suffix.lower() == ".json" and not _mooncake_line(first)):
        return "sharegpt-json"
    if p.suffix.lower() == ".jsonl" or first.startswith("{"):
        return "mooncake"
    header = {c.strip() for c in first.split(",")}
    if set(AZURE_COLUMNS) <= header:
        return "azure"
    if set(BURSTGPT_COLUMNS) <= header:
        return "burstgpt"
    if set(LENGTH_COLUMNS) <= header:
        return "length-stats"
    raise TraceError(
        f"{p.name}: unknown trace format (first line {first[:80]!r}); expected an Azure or "
        "BurstGPT CSV, a Mooncake JSONL, a length-statistics CSV or a ShareGPT JSON list"
    )


def load_trace(path: PathLike) -> LoadedTrace | LengthTable | ShareGPTLengths:
    """Sniff the format of ``path`` and load it with the matching loader."""
    fmt = sniff_format(path)
    if fmt == "sharegpt-json":
        return load_sharegpt(path)
    if fmt == "azure":
        return load_azure(path)
    if fmt == "burstgpt":
        return load_burstgpt(path)
    if fmt == "mooncake":
        return load_mooncake(path)
    return load_length_stats(path)
