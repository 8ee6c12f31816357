"""A run's result, the same for the simulator and the engine: per-request and per-iteration
tables, summary metrics, and where it is written.

`SimResult.write` puts a policy's tables and metrics under OUT/<policy folder>/, each file
written atomically; the folder is the policy's name with ':' and '/' as '_' (`policy_folder`),
checked so that it can neither escape the results folder nor clash with the files the folder
holds beside the policies (sim/results.py's markers, the study, the report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.records import RequestGaps
from costmodel.errors import ConfigError
from costmodel.files import atomic_write
from sim.results import COMPLETE, INCOMPLETE, MARKER
from traces._checks import shown

DEFAULT_SLO_TTFT_MS = 2000.0
DEFAULT_SLO_ITL_MS = 100.0
# Files a results folder holds beside the per-policy folders (sim/results.py, reports/)
RESULTS_FILES = (MARKER, COMPLETE, INCOMPLETE, "study.yaml", "report.html", "capacity.json")
POLICY_NAME_RULE = ("a policy's name names its results folder (':' and '/' become '_'): 1 to 100 "
                    "printable characters, not '.' or '..' nor " + ", ".join(RESULTS_FILES))


def policy_folder(name: object) -> str:
    """The folder (and --save-result suffix) of a policy's results: its name with ':' and '/'
    as '_'. A name that would escape the results folder, land in its root or clash with one of
    its files is a ConfigError stating the rule."""
    ok = isinstance(name, str) and 0 < len(name) <= 100 and name.isprintable()
    folder = name.replace(":", "_").replace("/", "_") if isinstance(name, str) else ""
    if not ok or not folder.strip() or folder in (".", "..", *RESULTS_FILES):
        raise ConfigError(f"policy name {shown(name)}: {POLICY_NAME_RULE}")
    return folder


@dataclass(frozen=True)
class SimResult:
    policy: str
    metrics: dict[str, Any]
    requests: pd.DataFrame = field(repr=False)
    iterations: pd.DataFrame = field(repr=False)
    # each finished request's inter-token gaps (None for a streamed run), and why each rejected
    # request never ran (req_id -> a core.admission.REJECTIONS text); for sim/vllm_result.py
    itls: RequestGaps | None = field(default=None, repr=False, compare=False)
    rejections: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    def write(self, out_dir: str | Path, setup: dict[str, Any] | None = None) -> Path:
        """Write requests/iterations parquet and metrics JSON under out_dir/<policy>/, atomically;
        `setup` (what produced the run, sim/results.py) goes into metrics.json as "setup"."""
        metrics = self.metrics if setup is None else {**self.metrics, "setup": setup}
        d = Path(out_dir) / policy_folder(self.policy)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "requests.parquet", lambda p: self.requests.to_parquet(p, index=False))
        atomic_write(d / "iterations.parquet", lambda p: self.iterations.to_parquet(p, index=False))
        atomic_write(d / "metrics.json",
                lambda p: p.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n"))
        return d
