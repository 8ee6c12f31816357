"""Sweeps: the same study across arrival rates and policies, one row per (policy, rate).

Rows carry the summary metrics; `write_sweep` stores them as `sweep.json` (what the report's
SLO-vs-rate and Pareto plots read) next to each point's tables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from costmodel.files import atomic_write
from sim.run import run_study
from sim.study import Study


def sweep(study: Study, rates: Sequence[float], out_dir: Path | None = None,
          on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rate in rates:
        _, _, results = run_study(study.model_copy(update={"rate": rate}))
        for r in results:
            row = {"rate": rate, **r.metrics}
            rows.append(row)
            if out_dir is not None:
                r.write(out_dir / f"rate_{rate:g}")
            if on_row:
                on_row(row)
    if out_dir is not None:
        write_sweep(rows, out_dir)
    return rows


def write_sweep(rows: list[dict[str, Any]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "sweep.json",
            lambda p: p.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n"))
