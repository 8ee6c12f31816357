"""Loaders for real request traces and length statistics.

Formats (one loader each, ``load_trace`` sniffs the header / extension and dispatches):

* Azure LLM inference 2023/2024 CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens`` (header and
  cells may be quoted); absolute ISO timestamps with up to 7 fractional digits (2024 adds a
  ``+00:00`` offset), parsed in one vectorised pandas call; rows may be slightly out of order
  and are sorted (stable); years 1678 to 2261 (pandas' nanosecond range), spanning at most
  ``MAX_TIME_S``.
* BurstGPT CSV: ``Timestamp`` (s, 0 to ``MAX_TIME_S``), ``Request tokens``, ``Response tokens``
  (other columns ignored).
* Mooncake JSONL: one object per line, ``timestamp`` (ms, 0 to ``MAX_TIME_S`` in ms),
  ``input_length``, ``output_length``, optional ``hash_ids`` (list of integers in [0, 2^63),
  one per 512 prompt tokens, kept on each Request for prefix caching).
* Length-statistics CSV: ``num_prefill_tokens,num_decode_tokens,...`` with no arrival times.
* vLLM's ShareGPT JSON (a list of conversations): sniffed here, read by
  ``traces.vllm_datasets.load_sharegpt`` (``resolve_workload`` dispatches).

Traces with arrival times become ``LoadedTrace``: arrivals in seconds relative to the first kept
request, finite, sorted, ``req_id`` 0..n-1 in arrival order. Token counts are integers from 0
to ``MAX_TOKENS`` (traces/_checks.py); rows with zero prompt or zero output tokens are skipped
and counted, so every request has positive counts. Any malformed row (not a number, not an
integer, negative, out of range, bad JSON) raises ``TraceError`` naming ``file:line`` and the
column or key. BurstGPT and Mooncake timestamps must be non-decreasing. A UTF-8 BOM, CRLF line
ends and blank lines anywhere are accepted in every format.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from traces._checks import MAX_TIME_S, MAX_TOKENS, TOKENS_BOUND, is_blank, json_problem, shown
from traces._table import (
    CsvTable,
    check_exists,
    check_monotone,
    float_column,
    int_column,
    read_csv_table,
)
from traces.errors import TraceError
from traces.request import MOONCAKE_BLOCK_SIZE, Request
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
    times_s: np.ndarray, prompt: np.ndarray, output: np.ndarray,
    hash_ids: Sequence[tuple[int, ...]] | None = None, hash_block_size: int = MOONCAKE_BLOCK_SIZE,
) -> tuple[Request, ...]:
    """Requests numbered 0..n-1 from parallel arrays (already in arrival order), each with
    its prompt's block hash ids when given (see traces.request)."""
    rows = zip(times_s.tolist(), prompt.tolist(), output.tolist(), strict=True)
    if hash_ids is None:
        return tuple(
            Request(req_id=i, arrival_s=float(t), prompt_tokens=int(p), output_tokens=int(o))
            for i, (t, p, o) in enumerate(rows)
        )
    return tuple(
        Request(i, float(t), int(p), int(o), ids, hash_block_size)
        for i, ((t, p, o), ids) in enumerate(zip(rows, hash_ids, strict=True))
    )


def _build_trace(
    name: str, times_s: np.ndarray, prompt: np.ndarray, output: np.ndarray, source: str,
    hash_ids: list[tuple[int, ...]] | None = None,
) -> LoadedTrace:
    """Drop zero-token rows, sort by time (stable), shift to 0 and number the requests."""
    keep = (prompt > 0) & (output > 0)
    skipped = int(np.count_nonzero(~keep))
    times_s, prompt, output = times_s[keep], prompt[keep], output[keep]
    if not len(times_s):
        raise TraceError(f"{name}: no requests left ({skipped} zero-token rows skipped)")
    order = np.argsort(times_s, kind="stable")
    rel = times_s[order] - times_s[order[0]]
    ids = None
    if hash_ids is not None:
        kept = [h for h, k in zip(hash_ids, keep.tolist(), strict=True) if k]
        ids = [kept[i] for i in order.tolist()]
    requests = requests_from_arrays(rel, prompt[order], output[order], ids)
    return LoadedTrace(requests=requests, skipped_zero=skipped, source=source)


# pandas' nanosecond range, whole years: beyond it pandas reads a timestamp or not depending on
# the other rows' precision, so it is refused whatever they are
STAMP_YEARS = (1678, 2261)


def _azure_stamps(table: CsvTable) -> pd.Series:
    """The TIMESTAMP column parsed (ISO 8601, UTC); a missing, malformed or out-of-range cell
    raises TraceError naming its line."""
    raw = table.frame["TIMESTAMP"].str.strip()
    stamps = pd.to_datetime(raw, format="ISO8601", utc=True, errors="coerce")
    low = pd.Timestamp(f"{STAMP_YEARS[0]}-01-01", tz="UTC")
    high = pd.Timestamp(f"{STAMP_YEARS[1] + 1}-01-01", tz="UTC")
    bad = (stamps.isna() | (stamps < low) | (stamps >= high)).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        cell = str(table.frame["TIMESTAMP"].iloc[row])
        alone = pd.to_datetime(pd.Series([cell.strip()]), format="ISO8601", utc=True,
                               errors="coerce")  # its own precision: a date, only out of range?
        if not cell.strip():
            what = "missing TIMESTAMP"
        elif alone.isna().iloc[0]:
            what = f"TIMESTAMP is not a timestamp: {shown(cell)} (expected ISO 8601 date and time)"
        else:
            what = (f"TIMESTAMP is out of range (years {STAMP_YEARS[0]} to {STAMP_YEARS[1]}): "
                    f"{shown(cell)}")
        raise TraceError(f"{table.name}:{table.line_of(row)}: {what}")
    return stamps


def load_azure(path: PathLike) -> LoadedTrace:
    """Load an Azure 2023/2024 LLM inference trace (CSV with absolute timestamps)."""
    p = Path(path)
    table = read_csv_table(p, AZURE_COLUMNS)
    stamps = _azure_stamps(table)
    prompt = int_column(table, "ContextTokens")
    output = int_column(table, "GeneratedTokens")
    seconds = (stamps - stamps.min()).dt.total_seconds().to_numpy(dtype=np.float64)
    far = np.flatnonzero(seconds > MAX_TIME_S)
    if len(far):
        cell = str(table.frame["TIMESTAMP"].iloc[int(far[0])])
        raise TraceError(f"{table.name}:{table.line_of(int(far[0]))}: TIMESTAMP {shown(cell)} is "
                         f"more than {MAX_TIME_S:g} s after the earliest one")
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


MAX_STAMP_MS = MAX_TIME_S * 1000.0
HASH_ID_LIMIT = 2**63  # Mooncake's block hashes are int64 ids


def _json_count(name: str, line: int, obj: dict[str, object], key: str) -> int:
    """A token count: a JSON integer (or integral number) from 0 to MAX_TOKENS."""
    value = obj.get(key)
    if value is None:
        raise TraceError(f"{name}:{line}: missing {key}")
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer()))):
        raise TraceError(f"{name}:{line}: {key} is not an integer: {shown(value)}")
    if value < 0:
        raise TraceError(f"{name}:{line}: {key} is negative: {shown(value)}")
    if value > MAX_TOKENS:
        raise TraceError(f"{name}:{line}: {key} is out of range ({TOKENS_BOUND}): {shown(value)}")
    return int(value)


def _json_stamp_ms(name: str, line: int, obj: dict[str, object]) -> float:
    """The row's timestamp: a finite JSON number of milliseconds from 0 to MAX_STAMP_MS."""
    stamp = obj.get("timestamp")
    if stamp is None:
        raise TraceError(f"{name}:{line}: missing timestamp")
    if (isinstance(stamp, bool) or not isinstance(stamp, (int, float))
            or (isinstance(stamp, float) and not math.isfinite(stamp))):
        raise TraceError(f"{name}:{line}: timestamp is not a finite number: {shown(stamp)}")
    if stamp < 0:
        raise TraceError(f"{name}:{line}: timestamp is negative: {shown(stamp)}")
    if stamp > MAX_STAMP_MS:
        raise TraceError(f"{name}:{line}: timestamp is out of range (0 to {MAX_STAMP_MS:g} ms): "
                         f"{shown(stamp)}")
    return float(stamp)


def _check_hash_ids(name: str, line: int, obj: dict[str, object]) -> tuple[int, ...]:
    """The row's prompt block ids (one per MOONCAKE_BLOCK_SIZE tokens), checked."""
    hash_ids = obj.get("hash_ids", [])
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and 0 <= h < HASH_ID_LIMIT
        for h in hash_ids
    ):
        raise TraceError(f"{name}:{line}: hash_ids is not a list of integers in [0, 2^63)")
    return tuple(hash_ids)


def _mooncake_row(name: str, line_no: int, line: str) -> dict[str, object]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise TraceError(f"{name}:{line_no}: invalid JSON ({json_problem(exc)})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{name}:{line_no}: expected a JSON object")
    return obj


def load_mooncake(path: PathLike) -> LoadedTrace:
    """Load a Mooncake JSONL trace (``timestamp`` in ms, relative)."""
    p = Path(path)
    check_exists(p)
    name = p.name
    times: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    hash_ids: list[tuple[int, ...]] = []
    last = -math.inf
    try:
        with p.open(encoding="utf-8-sig") as fh:
            for line_no, line in enumerate(fh, start=1):
                if is_blank(line):
                    continue
                obj = _mooncake_row(name, line_no, line)
                stamp = _json_stamp_ms(name, line_no, obj)
                if stamp < last:
                    raise TraceError(f"{name}:{line_no}: timestamp goes backwards "
                                     f"({stamp:g} after {last:g})")
                last = stamp
                hash_ids.append(_check_hash_ids(name, line_no, obj))
                prompt.append(_json_count(name, line_no, obj, "input_length"))
                output.append(_json_count(name, line_no, obj, "output_length"))
                times.append(stamp / 1000.0)
    except UnicodeDecodeError as exc:
        raise TraceError(f"{name}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise TraceError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if not times:
        raise TraceError(f"{name}: no data rows")
    return _build_trace(
        name,
        np.asarray(times, dtype=np.float64),
        np.asarray(prompt, dtype=np.int64),
        np.asarray(output, dtype=np.int64),
        f"Mooncake trace {name}",
        hash_ids,
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
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and "timestamp" in obj


def _header_cells(line: str) -> set[str]:
    """The cells of a CSV header line, quotes removed (Azure quotes its header)."""
    try:
        cells = next(csv.reader([line]), [])
    except csv.Error:  # a field over the csv module's limit: no header we know anyway
        cells = line.split(",")
    return {c.strip() for c in cells}


def _first_line(path: Path) -> str:
    """The first non-blank line of ``path``, stripped, at most 16 Mi characters of it (a JSON
    file may be one line; a Mooncake row with a long hash_ids list must stay whole); '' for a
    blank file. Lines end where the readers' text mode ends them (LF, CRLF, CR), not where
    str.splitlines would (form feeds and other separators too)."""
    try:
        with path.open(encoding="utf-8-sig") as fh:
            while chunk := fh.readline(1 << 24):
                if not is_blank(chunk):
                    return chunk.strip()
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise TraceError(f"{path.name}: cannot read ({exc.strerror or exc})") from None
    return ""


def sniff_format(path: PathLike) -> str:
    """Return 'azure', 'burstgpt', 'mooncake', 'length-stats' or 'sharegpt-json' (a JSON list,
    or a .json file not made of Mooncake rows; traces/vllm_datasets.py reads it) from the
    extension / header (the first non-blank line)."""
    p = Path(path)
    check_exists(p)
    first = _first_line(p)
    if not first:
        raise TraceError(f"{p.name}: empty file (nothing but blank lines)")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":  # JSON Lines is Mooncake's layout whatever the first row holds
        return "mooncake"
    if first.startswith("[") or (suffix == ".json" and not _mooncake_line(first)):
        return "sharegpt-json"
    if first.startswith("{"):
        return "mooncake"
    header = _header_cells(first)
    if set(AZURE_COLUMNS) <= header:
        return "azure"
    if set(BURSTGPT_COLUMNS) <= header:
        return "burstgpt"
    if set(LENGTH_COLUMNS) <= header:
        return "length-stats"
    raise TraceError(
        f"{p.name}: unknown trace format (first line {shown(first)}); expected an Azure or "
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
