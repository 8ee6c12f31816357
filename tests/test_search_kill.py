"""kill -9 at random moments: no finished probe lost, no partial file, the rerun completes with
the answer of an uninterrupted search; and the same search on a local Ray instance."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search import session
from search.probe import code_digest
from search.store import ProbeStore
from sim.results import check_complete
from tests.test_search_helpers import (
    ROOT,
    counted_fixture,  # noqa: F401 (the fixture `counted`)
    write_study,
)


def _reference(study: Path, tmp: Path) -> bytes:
    assert session.run(str(study), {}, {"store": str(tmp / "ref-store")}, out=tmp / "ref",
                       progress=False) == 0
    return (tmp / "ref" / "search.json").read_bytes()


def _kill_at(study: Path, out: Path, store: Path, after: int, jitter_s: float, jobs: int) -> None:
    """Start the search as its own process group; SIGKILL the whole group jitter_s after the
    store holds `after` records (or after the whole run, when it ends first)."""
    proc = subprocess.Popen([sys.executable, "-m", "cli.search", str(study), "--out", str(out),
                             "--jobs", str(jobs), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list((store / "probes").glob("??/*.json"))) >= after:
            break
        time.sleep(0.002)
    time.sleep(jitter_s)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it finished first: a kill after the end is no kill
        pass
    proc.wait()


def _check_store(store_dir: Path) -> set[str]:
    """Every visible record is whole and under its own key; returns the keys."""
    keys = set()
    for path in sorted((store_dir / "probes").glob("??/*.json")):
        record = json.loads(path.read_text())  # a partial file would not parse
        assert record["key"] == path.stem and "slo_attainment" in record["metrics"]
        keys.add(path.stem)
    return keys


def _check_out(out: Path) -> None:
    """The results folder is whole or absent (a dead run's hidden temp folder is no result)."""
    if out.exists():
        check_complete(out)
        assert (out / "COMPLETE").is_file() and not (out / "INCOMPLETE").exists()


def _kill_and_resume(tmp: Path, kills: int, jobs: int, seed: int, counted: list[str],
                     duration_s: float = 2.5, **grid: object) -> None:
    # the subprocesses hash the source tree now: so must this process (keys include it), not
    # when an earlier test first asked (in a shared checkout others may have edited it since)
    code_digest.cache_clear()
    study = write_study(tmp, duration_s, **grid)
    ref = _reference(study, tmp)
    total = len(ProbeStore(tmp / "ref-store").keys())
    rng = random.Random(seed)
    out = tmp / "out"
    kept: set[str] = set()
    interrupted = 0
    for _ in range(kills):  # each run resumes from what the ones before it stored
        if len(kept) >= total - 1:
            break
        # at a random probe count, a random moment into the probes that follow it
        _kill_at(study, out, tmp / "store", rng.randint(len(kept) + 1, total - 1),
                 rng.uniform(0, 0.05), jobs)
        keys = _check_store(tmp / "store")
        assert kept <= keys  # nothing finished before an earlier kill was lost since
        interrupted += len(keys) < total
        kept = keys
        _check_out(out)
    assert interrupted, "every kill came after the end: nothing was tested"
    counted.clear()
    assert session.run(str(study), {}, {"jobs": 0}, out=out, progress=False) == 0
    assert len(counted) == total - len(kept)  # only the probes not yet finished ran
    assert set(ProbeStore(tmp / "store").keys()) == set(ProbeStore(tmp / "ref-store").keys())
    assert (out / "search.json").read_bytes() == ref
    check_complete(out)



def test_kill_once_then_resume(tmp_path: Path, counted: list[str]) -> None:
    _kill_and_resume(tmp_path, kills=1, jobs=0, seed=16, counted=counted, ep=[1], gpu=["h200"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_at_random_moments_with_a_pool(tmp_path: Path, counted: list[str], seed: int) -> None:
    _kill_and_resume(tmp_path, kills=4, jobs=2, seed=seed, counted=counted, ep=[1])


@pytest.mark.slow
def test_same_results_on_pool_and_ray(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'layersim[ray]'); the "
                                      "Ray executor is optional")
    study = write_study(tmp_path)
    for name, grid in (("pool", {"jobs": 2}), ("ray", {"jobs": 2, "ray": True})):
        assert session.run(str(study), {}, {**grid, "store": str(tmp_path / f"store-{name}")},
                           out=tmp_path / name, progress=False) == 0
    for name in ("search.json", "search.parquet", "probes.parquet"):
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()
