"""CSV reading and vectorised column validation shared by the loaders.

Format: a comma-separated file with a header row (cells may be quoted, as Azure's are; a UTF-8
BOM, CRLF line ends and blank lines before the header, between rows or at the end are fine).
The whole file is read as strings with pandas, header included as row 0 so that pandas never
guesses an index from a wide first row and never renames duplicate columns; blank lines are
kept while reading, so data row ``i`` sits on file line ``lead + i + 2`` (``lead`` blank lines
before the header), then dropped. Each needed column is converted in one vectorised pass; the
first bad cell is reported as ``file:line: message``, the bound stated where one applies.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from traces._checks import MAX_TIME_S, MAX_TOKENS, TOKENS_BOUND, is_blank, shown
from traces.errors import TraceError


@dataclass(frozen=True, eq=False)
class CsvTable:
    """The string cells of a CSV file plus the 1-based file line of every data row."""

    name: str
    frame: pd.DataFrame
    lines: np.ndarray

    def line_of(self, row: int) -> int:
        return int(self.lines[row])


def check_exists(path: Path) -> None:
    if not path.exists():
        raise TraceError(f"trace file not found: {path}")
    if not path.is_file():
        raise TraceError(f"trace path is not a file: {path}")


def _leading_blank_lines(path: Path) -> int:
    """How many blank lines come before the header (pandas cannot take a blank first row)."""
    count = 0
    with path.open(encoding="utf-8-sig") as fh:
        for line in fh:
            if not is_blank(line):
                break
            count += 1
    return count


def read_csv_table(path: Path, required: tuple[str, ...]) -> CsvTable:
    """Read ``path`` as strings, check the header holds ``required``, drop blank rows."""
    check_exists(path)
    name = path.name
    try:
        lead = _leading_blank_lines(path)
        raw = pd.read_csv(
            path,
            header=None,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            skiprows=lead,
            index_col=False,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise TraceError(f"{name}: empty file (no header)") from None
    except pd.errors.ParserError as exc:
        raise TraceError(f"{name}:{_parser_message(exc)}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{name}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise TraceError(f"{name}: cannot read ({exc.strerror or exc})") from None
    header = [str(c).strip() for c in raw.iloc[0]]
    _check_header(name, lead + 1, header, required)
    frame = raw.iloc[1:].reset_index(drop=True)
    frame.columns = header
    lines = np.arange(len(frame), dtype=np.int64) + lead + 2
    if len(frame):
        blank = np.logical_and.reduce(
            [frame.iloc[:, j].str.strip().eq("").to_numpy() for j in range(frame.shape[1])]
        )
        if blank.any():
            frame = frame.loc[~blank].reset_index(drop=True)
            lines = lines[~blank]
    if not len(frame):
        raise TraceError(f"{name}: no data rows")
    return CsvTable(name=name, frame=frame, lines=lines)


def _check_header(name: str, line: int, header: list[str], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise TraceError(f"{name}:{line}: missing column(s) {', '.join(missing)}")
    twice = [c for c in required if header.count(c) > 1]
    if twice:
        raise TraceError(f"{name}:{line}: column {twice[0]} appears {header.count(twice[0])} "
                         "times; which one is meant is ambiguous")


def _parser_message(exc: Exception) -> str:
    """pandas' 'Expected 3 fields in line 5, saw 4' -> '5: expected 3 fields, saw 4'.

    Other parser messages come back as ' message' (to follow ``file:``).
    """
    text = str(exc).strip().splitlines()[-1]
    marker = "Expected "
    if marker in text and " in line " in text:
        detail = text[text.index(marker):]
        fields, rest = detail[len(marker):].split(" in line ", 1)
        line, _, saw = rest.partition(",")
        return f"{line.strip()}: expected {fields}, {saw.strip()}"
    unclosed = re.search(r"EOF inside string starting at row (\d+)", text)
    if unclosed:  # pandas counts rows from 0, skipped ones included
        return f"{int(unclosed.group(1)) + 1}: a quoted field is never closed"
    return f" {text}"


def _numbers(table: CsvTable, column: str) -> np.ndarray:
    """Column ``column`` as float64, NaN where a cell is not a number."""
    cells = table.frame[column].str.strip()
    return pd.to_numeric(cells, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _refuse_first(table: CsvTable, column: str, values: np.ndarray, ok: np.ndarray,
                  why: Callable[[float], str]) -> None:
    """Raise for the first row (in file order) not ``ok``, with ``why(value)`` as the reason."""
    if ok.all():
        return
    row = int(np.flatnonzero(~ok)[0])
    cell = str(table.frame[column].iloc[row])
    line = table.line_of(row)
    if not cell.strip():
        raise TraceError(f"{table.name}:{line}: missing {column}")
    value = float(values[row])
    # a number too long for float64 ('1e400', 400 digits) is out of range, not malformed
    digits = cell.strip().lstrip("+")
    if math.isnan(value) and digits.isascii() and digits.isdigit():
        value = sys.float_info.max
    elif math.isinf(value) and "inf" not in cell.lower():
        value = math.copysign(sys.float_info.max, value)
    raise TraceError(f"{table.name}:{line}: {column} {why(value)}: {shown(cell)}")


def _token_problem(value: float) -> str:
    if not math.isfinite(value) or (0 <= value <= MAX_TOKENS and not value.is_integer()):
        return "is not an integer"
    return "is negative" if value < 0 else f"is out of range ({TOKENS_BOUND})"


def _time_problem(value: float) -> str:
    if not math.isfinite(value):
        return "is not a finite number"
    return "is negative" if value < 0 else f"is out of range (0 to {MAX_TIME_S:g} s)"


def int_column(table: CsvTable, column: str) -> np.ndarray:
    """Token-count column ``column`` as int64 in [0, MAX_TOKENS]; empty, non-integer, negative
    or larger cells raise TraceError."""
    values = _numbers(table, column)
    with np.errstate(invalid="ignore"):
        ok = (values >= 0) & (values <= MAX_TOKENS) & (values == np.floor(values))
    _refuse_first(table, column, values, ok, _token_problem)
    return values.astype(np.int64)


def float_column(table: CsvTable, column: str) -> np.ndarray:
    """Time column ``column`` (seconds) as float64 in [0, MAX_TIME_S]; empty, non-numeric,
    infinite, negative or larger cells raise TraceError."""
    values = _numbers(table, column)
    with np.errstate(invalid="ignore"):
        ok = (values >= 0) & (values <= MAX_TIME_S)
    _refuse_first(table, column, values, ok, _time_problem)
    return values


def check_monotone(name: str, times: np.ndarray, lines: np.ndarray, column: str) -> None:
    """Raise at the first row whose time is earlier than the row before it."""
    if len(times) < 2:
        return
    drops = np.flatnonzero(np.diff(times) < 0)
    if len(drops):
        row = int(drops[0]) + 1
        raise TraceError(
            f"{name}:{int(lines[row])}: {column} goes backwards "
            f"({times[row]:g} after {times[row - 1]:g})"
        )
