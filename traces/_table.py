"""CSV reading and vectorised column validation shared by the loaders.

Format: a comma-separated file with a header row. The whole file is read as strings with pandas
(blank lines kept, so data row ``i`` sits on file line ``i + 2``), fully blank rows are dropped,
then each needed column is converted in one vectorised pass; the first bad cell is reported as
``file:line: message``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

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
    if not path.is_file():
        raise TraceError(f"trace file not found: {path}")


def read_csv_table(path: Path, required: tuple[str, ...]) -> CsvTable:
    """Read ``path`` as strings, check the header holds ``required``, drop blank rows."""
    check_exists(path)
    name = path.name
    try:
        _check_first_row_width(path)
        frame = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            index_col=False,
            encoding="utf-8-sig",
        )
    except pd.errors.EmptyDataError:
        raise TraceError(f"{name}: empty file (no header)") from None
    except pd.errors.ParserError as exc:
        raise TraceError(f"{name}:{_parser_message(exc)}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{name}: not UTF-8 text ({exc.reason})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise TraceError(f"{name}:1: missing column(s) {', '.join(missing)}")
    lines = np.arange(len(frame), dtype=np.int64) + 2
    if len(frame):
        blank = (frame == "").all(axis=1).to_numpy()
        if blank.any():
            frame = frame.loc[~blank].reset_index(drop=True)
            lines = lines[~blank]
    if not len(frame):
        raise TraceError(f"{name}: no data rows")
    return CsvTable(name=name, frame=frame, lines=lines)


def _check_first_row_width(path: Path) -> None:
    """pandas silently treats extra fields in the first data row as an index; refuse them."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                raise TraceError(
                    f"{path.name}:{reader.line_num}: expected {len(header)} fields, "
                    f"saw {len(row)}"
                )
            return


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
    return f" {text}"


def int_column(table: CsvTable, column: str) -> np.ndarray:
    """Column ``column`` as int64; empty, non-integer or negative cells raise TraceError."""
    raw = table.frame[column]
    values = pd.to_numeric(raw.str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values < 0) | (values != np.floor(values))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        cell = str(raw.iloc[row])
        line = table.line_of(row)
        if cell.strip() == "":
            raise TraceError(f"{table.name}:{line}: missing {column}")
        if np.isfinite(values[row]) and values[row] < 0:
            raise TraceError(f"{table.name}:{line}: {column} is negative: {cell!r}")
        raise TraceError(f"{table.name}:{line}: {column} is not an integer: {cell!r}")
    return values.astype(np.int64)


def float_column(table: CsvTable, column: str) -> np.ndarray:
    """Column ``column`` as finite float64; empty or non-numeric cells raise TraceError."""
    raw = table.frame[column]
    values = pd.to_numeric(raw.str.strip(), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        cell = str(raw.iloc[row])
        line = table.line_of(row)
        if cell.strip() == "":
            raise TraceError(f"{table.name}:{line}: missing {column}")
        raise TraceError(f"{table.name}:{line}: {column} is not a finite number: {cell!r}")
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
