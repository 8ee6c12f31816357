"""The named workloads' trace files ship inside the package, with provenance and licences.

A fresh clone or a non-editable install has no ``../shared/traces``: every named workload must be
found in ``traces/data/``, every file there must be matched by pyproject's package-data (or a
wheel would leave it out), and the README next to the data must name each file's checksum and
licence. One test builds the package into a folder, as a wheel would, and loads the data from it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from traces import TraceError, WorkloadSpec, build_workload, data_dir, resolve_workload
from traces.workload import NAMED_FILES, PACKAGED_DATA

ROOT = Path(__file__).resolve().parent.parent
README = PACKAGED_DATA / "README.md"


def _shipped_files() -> list[Path]:
    return sorted(p for p in PACKAGED_DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def test_named_workloads_read_the_packaged_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERSIM_TRACES_DIR", raising=False)
    assert data_dir() == PACKAGED_DATA
    for name, filename in NAMED_FILES.items():
        assert (PACKAGED_DATA / filename).is_file(), name
    w = build_workload(WorkloadSpec("sharegpt", rate=4.0, duration_s=20.0))
    assert w.description.startswith("sharegpt: lengths resampled from length statistics "
                                    "sharegpt_8k_stats_llama2.csv (30731 rows)")


def test_traces_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAYERSIM_TRACES_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(TraceError, match="LAYERSIM_TRACES_DIR names a folder without it"):
        resolve_workload("azure-conv")


def test_package_data_globs_cover_every_shipped_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["traces"]
    package = PACKAGED_DATA.parent
    for path in _shipped_files():
        rel = path.relative_to(package).as_posix()
        # setuptools globs: '*' does not cross '/', as fnmatch on each path part
        assert any(len(g.split("/")) == len(rel.split("/")) and all(
            fnmatch.fnmatchcase(part, pat) for part, pat in zip(rel.split("/"), g.split("/"), strict=True)
        ) for g in globs), f"{rel} is not in pyproject's package-data for traces"


def test_readme_names_each_files_checksum_and_licence() -> None:
    text = README.read_text()
    for path in _shipped_files():
        if path.parent != PACKAGED_DATA or path.suffix not in (".csv", ".jsonl"):
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        row = next((line for line in text.splitlines() if f"`{path.name}`" in line and "|" in line), None)
        assert row is not None, f"{path.name} has no row in {README}"
        assert digest in row, f"{path.name} changed: its sha256 is {digest}"
        assert re.search(r"\| (CC-BY-4\.0|Apache-2\.0|MIT) \|", row), row
    for link in re.findall(r"\]\((licenses/[^)]+)\)", text):
        assert (PACKAGED_DATA / link).is_file(), link


def test_built_package_carries_the_data(tmp_path: Path) -> None:
    """Build the package as a wheel would (setuptools build_py) and load every workload from it."""
    # a copy, so that the build writes nothing into the checkout and no ../shared is beside it
    src, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "results", "out"))
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                    "--build-lib", str(target)], cwd=src, check=True, capture_output=True, timeout=300)
    script = (
        "import traces; from traces import WorkloadSpec, build_workload\n"
        f"assert traces.__file__.startswith({str(target)!r}), traces.__file__\n"
        "for name in ('sharegpt', 'arxiv', 'arxiv-long'):\n"
        "    build_workload(WorkloadSpec(name, rate=1.0, num_requests=5))\n"
        "for name in ('azure-conv', 'mooncake'):\n"
        "    build_workload(WorkloadSpec(name, num_requests=5))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LAYERSIM_TRACES_DIR"}
    env["PYTHONPATH"] = str(target)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
