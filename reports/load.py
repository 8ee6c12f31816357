"""Discover and load a results folder: every run (a folder holding metrics.json, plus its
requests/iterations parquet when present), and the optional sweep, capacity and validation files.

Anything absent is None so the report can skip the plots it feeds; a folder with nothing
loadable is a ValueError naming the path, which the CLI prints as its one-line error. So is a
run that is visibly not whole: a table without its metrics.json, or a requests table whose
finished requests and token totals disagree with its metrics.json (another run's file).
`check_complete` (for `layersim report`) also refuses a folder a layersim run left incomplete
(sim/results.py).
Runs come in study order: the order of the study's `policies` when the folder records it, else
the order they were written (a recorded index, else metrics.json's modification time), never
alphabetical.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from reports.setup import Setup, load_setup
from sim.results import check_complete as _check_whole

# Subfolders the engine's validate command writes under DIR/<policy>/; shown as a suffix.
_SOURCES = ("engine", "sim")
_TABLES = ("requests.parquet", "iterations.parquet")


@dataclass(frozen=True, eq=False)
class Run:
    """One simulated or measured run. eq=False: DataFrames have no plain truth value."""

    label: str  # unique within a report: policy, plus source or folder when needed
    policy: str
    path: Path  # folder relative to the results root
    metrics: dict[str, Any]
    requests: pd.DataFrame | None = field(default=None, repr=False)
    iterations: pd.DataFrame | None = field(default=None, repr=False)

    def metric(self, key: str) -> float | None:
        """A numeric metric, or None when missing, null, non-numeric or NaN."""
        return as_float(self.metrics.get(key))


@dataclass(frozen=True, eq=False)
class Capacity:
    search: pd.DataFrame  # one row per probed rate: rate, slo_attainment, meets, ...
    answer: dict[str, Any]
    target: float | None  # attainment the search had to meet, when the file says


@dataclass(frozen=True, eq=False)
class Results:
    root: Path
    runs: tuple[Run, ...]
    sweep: pd.DataFrame | None = None
    capacity: Capacity | None = None
    validation: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()  # files skipped as unreadable, shown in the report
    setup: Setup = field(default_factory=lambda: Setup((), (), ()))


def as_float(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def check_complete(root: str | Path) -> None:
    """ValueError naming what is missing when `root` is a results folder a layersim run left
    incomplete (interrupted, or files changed or added since); other folders pass."""
    root = Path(root)
    if root.is_dir():
        _check_whole(root)


def load_results(root: str | Path) -> Results:
    root = Path(root)
    if not root.exists():
        raise ValueError(f"results folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"not a results folder: {root}")
    notes: list[str] = []
    written = _load_runs(root, notes)
    sweep = _load_sweep(root, notes)
    cap_raw = _read_json(root / "capacity.json", notes)
    capacity = _load_capacity(cap_raw, notes)
    validation = _read_json(root / "validation.json", notes)
    if not isinstance(validation, dict):
        validation = None
    if not written and sweep is None and capacity is None:
        raise ValueError(f"no results in {root} (no */metrics.json, sweep.json/csv or capacity.json)")
    setup = load_setup(root, [w[0].metrics for w in written], cap_raw, validation, notes)
    runs = study_order(written, setup.policies)
    return Results(root, tuple(runs), sweep, capacity, validation, tuple(notes), setup)


def _tag(policy: str) -> str:
    """The folder name a policy's results are written to (sim/cluster.py)."""
    return policy.replace(":", "_").replace("/", "_")


def _study_rank(run: Run, policies: tuple[str, ...]) -> int:
    """Position of the run's policy in the study: exact name, folder name, or a spec that the
    policy's canonical name extends (`hybrid` ran as `hybrid:512`)."""
    top = run.path.parts[0] if run.path.parts else ""
    for i, spec in enumerate(policies):
        if run.policy == spec or top == _tag(spec):
            return i
    for i, spec in enumerate(policies):
        if ":" not in spec and run.policy.split(":", 1)[0] == spec:
            return i
    return len(policies)


def study_order(written: list[tuple[Run, int | None, int]], policies: tuple[str, ...]) -> list[Run]:
    """Runs in study order, then recorded index, then write time; the folder path breaks ties."""
    return [w[0] for w in sorted(written, key=lambda w: (
        _study_rank(w[0], policies), w[1] if w[1] is not None else -1, w[2], w[0].path.as_posix()))]


def _metrics_dirs(root: Path) -> list[Path]:
    found: list[Path] = []
    # os.walk with sorted, pruned dir lists: deterministic order, no hidden or temp folders,
    # and symlinks are not followed (a link back up the tree would loop).
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "metrics.json" in files:
            found.append(Path(here))
        elif table := next((t for t in _TABLES if t in files), None):
            raise ValueError(f"{Path(here) / table}: a run's table without its metrics.json "
                             "(an incomplete run); write the run again")
    return found


def _check_same_run(d: Path, metrics: dict[str, Any], requests: pd.DataFrame | None) -> None:
    """A requests table and metrics.json from different runs (a re-run that overwrote only one)
    disagree on the finished requests or their tokens; core/metrics.py counts both alike."""
    if requests is None or not {"finished", "prompt_tokens", "output_tokens"} <= set(requests):
        return
    done = requests["finished"].astype(bool)
    if "warmup" in requests:
        done &= ~requests["warmup"].astype(bool)
    counted = {"completed": int(done.sum()),
               "total_input_tokens": int(requests.loc[done, "prompt_tokens"].sum()),
               "total_output_tokens": int(requests.loc[done, "output_tokens"].sum())}
    for key, n in counted.items():
        want = as_float(metrics.get(key))
        if want is not None and want != n:
            raise ValueError(f"{d / 'requests.parquet'}: {n} for {key}, {d / 'metrics.json'} says "
                             f"{want:g}: the two files are from different runs; write the run again")


def _written(d: Path, metrics: dict[str, Any]) -> tuple[int | None, int]:
    """(recorded run index, metrics.json mtime in ns): the order the runs were written."""
    index = next((int(v) for k in ("run_index", "index", "order")
                  if (v := as_float(metrics.get(k))) is not None), None)
    try:
        return index, (d / "metrics.json").stat().st_mtime_ns
    except OSError:
        return index, 0


def _load_runs(root: Path, notes: list[str]) -> list[tuple[Run, int | None, int]]:
    raw: list[tuple[str, Path, dict[str, Any], pd.DataFrame | None, pd.DataFrame | None]] = []
    for d in _metrics_dirs(root):
        metrics = _read_json(d / "metrics.json", notes)
        if not isinstance(metrics, dict):
            if metrics is not None:
                notes.append(f"{_rel(d / 'metrics.json', root)}: not a JSON object, skipped")
            continue
        rel = d.relative_to(root)
        policy = str(metrics.get("policy") or (rel.as_posix() if rel.parts else root.name))
        requests = _read_parquet(d / "requests.parquet", root, notes)
        _check_same_run(d, metrics, requests)
        raw.append((policy, rel, metrics, requests, _read_parquet(d / "iterations.parquet", root, notes)))
    labels = _labels([(policy, rel) for policy, rel, *_ in raw])
    return [(Run(lab, policy, rel, metrics, req, it), *_written(root / rel, metrics))
            for lab, (policy, rel, metrics, req, it) in zip(labels, raw, strict=True)]


def _labels(keys: list[tuple[str, Path]]) -> list[str]:
    """Policy names, tagged with engine/sim when validate wrote them, else the folder if clashing."""
    first = []
    for policy, rel in keys:
        tag = rel.name if rel.name in _SOURCES and len(rel.parts) > 1 else ""
        first.append(f"{policy} [{tag}]" if tag else policy)
    if len(set(first)) == len(first):
        return first
    # Runs of one policy in several folders (e.g. a sweep's rate_*/ folders): the path tells them apart.
    return [f"{lab} ({rel.as_posix()})" if first.count(lab) > 1 else lab
            for lab, (_, rel) in zip(first, keys, strict=True)]


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{path.name} in {path.parent}: unreadable ({type(e).__name__}), skipped")
        return None


def _read_parquet(path: Path, root: Path, notes: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        notes.append(f"{_rel(path, root)}: unreadable ({type(e).__name__}), skipped")
        return None


def _rows(data: Any) -> list[dict[str, Any]] | None:
    """A list of row dicts, bare or under a conventional key."""
    if isinstance(data, dict):
        for key in ("rows", "results", "sweep", "search", "points"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return data
    return None


def _load_sweep(root: Path, notes: list[str]) -> pd.DataFrame | None:
    df: pd.DataFrame | None = None
    if (root / "sweep.json").is_file():
        data = _read_json(root / "sweep.json", notes)
        rows = _rows(data)
        if rows is not None:
            df = pd.DataFrame(rows)
        elif data is not None:
            notes.append("sweep.json: no list of rows found, skipped")
    elif (root / "sweep.csv").is_file():
        try:
            df = pd.read_csv(root / "sweep.csv")
        except (OSError, ValueError, pd.errors.ParserError) as e:
            notes.append(f"sweep.csv: unreadable ({type(e).__name__}), skipped")
    if df is None or df.empty:
        return None
    return df


def _load_capacity(data: Any, notes: list[str]) -> Capacity | None:
    if data is None:
        return None
    rows = _rows(data)
    if rows is None:
        notes.append("capacity.json: no search rows found, skipped")
        return None
    answer = data.get("answer") if isinstance(data, dict) else None
    answer = answer if isinstance(answer, dict) else {}
    target = None
    # The search's goal may sit at the top level or in the answer, under one of a few names.
    for src in (answer, data if isinstance(data, dict) else {}):
        for key in ("target", "target_attainment", "attainment_target", "slo_target", "min_attainment"):
            if target is None:
                target = as_float(src.get(key))
    return Capacity(pd.DataFrame(rows), answer, target)
