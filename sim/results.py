"""A results folder: what a run wrote, and everything that produced it.

Every folder layersim writes (`simulate`, `compare` and `capacity` with `--out DIR`) holds,
besides its tables and report, `study.yaml`, the fully resolved study (every key, so that
`layersim compare DIR/study.yaml` re-runs it to byte-identical tables), and `run.json`: the
layersim version, the command, and the setup (model, GPU, parallelism, data types, the profile
with its provenance, workload, rate, seed, SLO, price). Each policy's `metrics.json` carries the
same setup. No wall-clock time is recorded anywhere, so a re-run matches byte for byte.

Reuse: the folder is written whole into a hidden sibling and renamed into place at the end, so
an interrupted run leaves the old folder (or none). An earlier layersim results folder (it has a
`run.json`) at that path is replaced whole, so old runs never mix into the new report; any other
non-empty folder is refused before anything runs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from costmodel import ConfigError, CostModel

MARKER = "run.json"


def layersim_version() -> str:
    try:
        return metadata.version("layersim")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def check_out(out: Path | None) -> None:
    """Fail before simulating, not after, when `out` cannot become a results folder."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"--out {out}: a non-empty folder that is not a layersim results folder; "
                          "give a new or empty folder (a results folder is replaced whole)")
    if not out.parent.exists():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")


@contextmanager
def results_folder(out: Path) -> Iterator[Path]:
    """Yield a folder of `out`'s own name inside a hidden sibling (so that what is written there,
    the report's title included, names `out`); on success it replaces `out` whole."""
    check_out(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / out.name).mkdir(parents=True)
    try:
        yield tmp / out.name
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        (tmp / out.name).rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def setup_record(study: Any, cm: CostModel, **extra: Any) -> dict[str, Any]:
    """What produced a run, for run.json and every metrics.json."""
    prov = cm.profile.provenance
    m = cm.model
    rate, duration_s = study.arrivals()
    return {
        "layersim_version": layersim_version(),
        "model": m.name, "gpu": cm.hw.name, "tp": cm.parallel.tp, "ep": cm.parallel.ep,
        "replicas": study.replicas, "router": study.router,
        "dtype": m.weight_dtype, "expert_dtype": m.expert_dtype, "kv_cache_dtype": m.kv_cache_dtype,
        "routing_skew": m.routing_skew,
        "profile": {"label": cm.profile.label, "file": study.profile,
                    "source": prov.get("source"), "date": prov.get("date"),
                    "framework_versions": prov.get("framework_versions")},
        # the arrivals as built: rate None and replay True when a trace replays its own
        "workload": study.workload, "rate": rate, "replay": study.replays_trace(),
        "arrival": study.arrival, "duration_s": duration_s, "num_requests": study.num_requests,
        "max_concurrency": study.max_concurrency, "warmup_requests": study.warmup_requests,
        "seed": study.seed,
        "slo_ttft_ms": study.slo_ttft_ms, "slo_itl_ms": study.slo_itl_ms,
        "slo_tpot_ms": study.slo_tpot_ms, "slo_e2el_ms": study.slo_e2el_ms,
        **extra,
    }


def _absolute(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).is_file() else name


def _absolute_policy(spec: str) -> str:
    target, sep, cls = spec.rpartition(":")
    return f"{_absolute(target)}:{cls}" if sep and target.endswith(".py") else spec


def write_provenance(folder: Path, study: Any, setup: dict[str, Any], command: list[str]) -> None:
    # defaults resolved (GPU, data types, skew); the profile stays as given: null is the one
    # shipped for the GPU (run.json names it), a path stays a path
    resolved = study.model_copy(update={**{k: setup[k] for k in (
        "gpu", "dtype", "expert_dtype", "kv_cache_dtype", "routing_skew")},
        # files named relative to where the run started: absolute, to re-run from anywhere
        "workload": _absolute(study.workload),
        "policies": [_absolute_policy(p) for p in study.policies]})
    (folder / "study.yaml").write_text(
        "# the fully resolved study that produced this folder: layersim compare study.yaml\n"
        + yaml.safe_dump(resolved.model_dump(), sort_keys=False))
    run = {"layersim_version": setup["layersim_version"], "command": ["layersim", *command],
           "setup": setup}
    (folder / MARKER).write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
