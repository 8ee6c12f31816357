"""A results folder: what a run wrote, and everything that produced it.

Every folder layersim writes (`simulate`, `compare` and `capacity` with `--out DIR`) holds,
besides its tables and report, `study.yaml`, the fully resolved study (every key, so that
`layersim compare DIR/study.yaml` re-runs it to byte-identical tables), and `run.json`: the
layersim version, the command, and the setup (model, GPU, parallelism, data types, the profile
with its provenance, workload, rate, seed, SLO, price). Each policy's `metrics.json` carries the
same setup. No wall-clock time is recorded anywhere, so a re-run matches byte for byte.

Completeness: the folder is written whole into a hidden sibling (`.NAME.tmp-PID`, holding
`INCOMPLETE` meanwhile) and renamed into place at the end, after `COMPLETE`, written last, lists
every file with its size and SHA-256; `layersim report` refuses a folder that lacks it or whose
files differ from it. An interrupted run leaves the old folder (or none) plus a hidden sibling
named with its PID, which the next write into the same parent removes once that process is gone.
An earlier layersim results folder at that path is replaced whole, so old runs never mix into
the new report; any other non-empty folder is refused before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from costmodel import ConfigError
from costmodel.files import atomic_write

if TYPE_CHECKING:
    from costmodel import CostModel

MARKER = "run.json"
COMPLETE = "COMPLETE"  # written last: what the finished folder holds (see write_manifest)
INCOMPLETE = "INCOMPLETE"  # present while the folder is being written
# What a report reads; such a file that COMPLETE does not list came from another run.
_RESULT_SUFFIXES = (".json", ".parquet", ".csv", ".yaml")
# `layersim report` rewrites the report in place, so the manifest's entry for it is advisory.
_REWRITTEN = ("report.html",)
# Hidden siblings of an --out folder (results_folder) and of an atomically written file
# (costmodel/files.py): .NAME.tmp-PID and .NAME.old-PID.
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]{1,12})", re.DOTALL)
_NAME_BYTES = 100  # of the out name kept in a sibling's name, so that it stays a legal name


def layersim_version() -> str:
    try:
        return metadata.version("layersim")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _is_ours(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (MARKER, COMPLETE, INCOMPLETE))


def check_out(out: Path | None) -> None:
    """Fail before simulating, not after, when `out` cannot become a results folder."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_ours(out):
        raise ConfigError(f"--out {out}: a non-empty folder that is not a layersim results folder; "
                          "give a new or empty folder (a results folder is replaced whole)")
    if not out.parent.exists():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")


def _sibling(out: Path, kind: str) -> Path:
    short = out.name.encode()[:_NAME_BYTES].decode(errors="ignore")
    return out.parent / f".{short}.{kind}-{os.getpid()}"


@contextmanager
def results_folder(out: Path) -> Iterator[Path]:
    """Yield a folder of `out`'s own name inside a hidden sibling (so that what is written there,
    the report's title included, names `out`); on success it replaces `out` whole.

    The folder holds INCOMPLETE while it is written; at the end COMPLETE, listing every file
    with its size and hash, is written last, and only then is the folder renamed into place. A
    kill -9 leaves a hidden sibling named with the dead PID, which the next write into the
    same parent removes (clean_leftovers)."""
    check_out(out)
    clean_leftovers(out.parent)
    tmp, old = _sibling(out, "tmp"), _sibling(out, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    folder = tmp / out.name
    folder.mkdir(parents=True)
    (folder / INCOMPLETE).write_text(f"being written by layersim (process {os.getpid()})\n")
    try:
        yield folder
        (folder / INCOMPLETE).unlink()
        write_manifest(folder)
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            old.mkdir()
            out.rename(old / out.name)
        folder.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, OSError):  # no such process can exist
        return False
    return True


def clean_leftovers(parent: Path) -> list[Path]:
    """Remove what interrupted layersim writes left in `parent`, returning what went.

    Only hidden .NAME.tmp-PID / .NAME.old-PID entries of processes no longer alive, shaped as
    layersim leaves them: a plain file (an atomic write's temp), or a folder holding at most
    one folder. A results folder moved aside (old) when the crash came before the new one
    took its place goes back to its own name. Anything else is left alone."""
    removed: list[Path] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _LEFTOVER.fullmatch(p.name)
        if m is None or _alive(int(m["pid"])) or p.is_symlink():
            continue
        try:
            if p.is_file():
                if m["kind"] == "tmp":
                    p.unlink()
                    removed.append(p)
                continue
            if not p.is_dir():
                continue
            inner = list(p.iterdir())
            if len(inner) > 1 or any(c.is_symlink() or not c.is_dir() for c in inner):
                continue
            if m["kind"] == "old" and inner and _is_ours(inner[0]):
                target = parent / inner[0].name
                if not target.exists():
                    inner[0].rename(target)
            shutil.rmtree(p)
            removed.append(p)
        except OSError:  # best effort: a leftover we cannot remove harms nothing
            continue
    return removed


def _files(folder: Path) -> list[str]:
    """Every plain, non-hidden file under `folder`, as sorted relative POSIX paths."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(here).relative_to(folder)
        found += [(rel / f).as_posix() for f in files if not f.startswith(".")]
    return sorted(found)


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _write_listing(folder: Path, files: dict[str, Any]) -> None:
    text = json.dumps({"files": files}, indent=1, sort_keys=True) + "\n"
    atomic_write(folder / COMPLETE, lambda p: p.write_text(text))


def write_manifest(folder: Path) -> None:
    """Write COMPLETE: every file in `folder` with its size and SHA-256 (no times, so a re-run
    writes the same bytes)."""
    _write_listing(folder, {n: _digest(folder / n) for n in _files(folder) if n != COMPLETE})


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        files = json.loads((folder / COMPLETE).read_text())["files"]
        ok = isinstance(files, dict) and all(
            isinstance(v, dict) and not Path(k).is_absolute() and ".." not in Path(k).parts
            for k, v in files.items())
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise ConfigError(f"{folder / COMPLETE}: damaged (not the JSON list of files layersim "
                          "writes); run the study again with --out")
    return files  # type: ignore[no-any-return]


def check_complete(folder: Path) -> None:
    """Raise ConfigError, naming what is wrong, unless `folder` is whole: COMPLETE present and
    every file it lists there unchanged, with no result file beside them from another run.
    A folder no layersim command wrote (no run.json or markers) passes: the loader judges it."""
    incomplete = f"{folder}: incomplete results folder"
    for p in (folder, folder.parent):
        m = _LEFTOVER.fullmatch(p.name)
        if m is not None and m["kind"] == "tmp":
            raise ConfigError(f"{incomplete}: {p.name} is the temporary folder of a layersim "
                              f"run that was interrupted or is still running (process {m['pid']})")
    if (folder / INCOMPLETE).is_file():
        raise ConfigError(f"{incomplete}: {INCOMPLETE} is present (its run was interrupted or is "
                          "still running)")
    if not (folder / COMPLETE).is_file():
        if (folder / MARKER).is_file():
            raise ConfigError(f"{incomplete}: no {COMPLETE} marker (its run did not finish, or an "
                              "older layersim wrote it); run it again with --out")
        return
    listed = _manifest(folder)
    for name, want in sorted(listed.items()):
        path = folder / name
        if name in _REWRITTEN:
            continue
        if not path.is_file():
            raise ConfigError(f"{incomplete}: {name} is missing ({COMPLETE} lists it)")
        try:
            got = _digest(path)
        except OSError as e:
            raise ConfigError(f"{incomplete}: {name} is unreadable ({e.strerror or e})") from e
        if got != {k: want.get(k) for k in got}:
            raise ConfigError(f"{folder}: {name} changed after the run that wrote it ({COMPLETE} "
                              "records another size or hash); run it again with --out")
    extra = [n for n in _files(folder) if n not in listed and n != COMPLETE
             and Path(n).suffix in _RESULT_SUFFIXES]
    if extra:
        raise ConfigError(f"{folder}: {extra[0]} is not from the run that wrote this folder "
                          f"({COMPLETE} does not list it); remove it or run again with --out")


def record_rewritten(folder: Path) -> None:
    """After `layersim report` rewrote a completed folder's report.html, list its new hash
    (and nothing else: a changed table stays changed)."""
    if (folder / COMPLETE).is_file():
        listed = _manifest(folder)
        _write_listing(folder, listed | {n: _digest(folder / n) for n in _REWRITTEN
                                         if (folder / n).is_file()})


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
        "async_scheduling": study.async_scheduling,
        **_pools(study),
        **extra,
    }


# a disaggregated run's keys (sim/disagg.py), or those of a search of its pools' sizes
POOL_KEYS = ("split_pools", "prefill_replicas", "decode_replicas", "decode_tp", "decode_policy",
             "kv_link_gb_per_s", "kv_link_latency_us", "stream_kv")


def _pools(study: Any) -> dict[str, Any]:
    if study.prefill_replicas is None and not study.split_pools:
        return {}
    return {key: getattr(study, key) for key in POOL_KEYS}


def _absolute(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).is_file() else name


def _absolute_policy(spec: str) -> str:
    target, sep, cls = spec.rpartition(":")
    return f"{_absolute(target)}:{cls}" if sep and target.endswith(".py") else spec


def write_provenance(folder: Path, study: Any, setup: dict[str, Any], command: list[str]) -> None:
    import yaml  # here: only a run with --out writes study.yaml

    # defaults resolved (GPU, data types, skew); the profile stays as given: null is the one
    # shipped for the GPU (run.json names it), a path stays a path
    resolved = study.model_copy(update={**{k: setup[k] for k in (
        "gpu", "dtype", "expert_dtype", "kv_cache_dtype", "routing_skew")},
        # files named relative to where the run started: absolute, to re-run from anywhere
        "workload": _absolute(study.workload),
        "policies": [_absolute_policy(p) for p in study.policies]})
    verb = command[0] if command and command[0] in ("compare", "simulate", "capacity") else "compare"
    (folder / "study.yaml").write_text(
        f"# the fully resolved study that produced this folder: layersim {verb} study.yaml\n"
        + yaml.safe_dump(resolved.model_dump(), sort_keys=False))
    run = {"layersim_version": setup["layersim_version"], "command": ["layersim", *command],
           "setup": setup}
    (folder / MARKER).write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
