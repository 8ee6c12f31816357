"""Edge cases of results folders (whole or recognisably not, even after kill -9; leftovers of
dead runs cleaned, nothing else) and of the result columns (they count what their names say)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from cli.main import main
from core.records import Recorder
from costmodel import ConfigError, CostModel, Parallelism, load_model
from policies import ChunkedPrefill
from policies.state import PlanError, ReplicaState
from reports import load_results
from reports.cli import report_main
from sim import simulate
from sim.results import COMPLETE, INCOMPLETE, check_complete, clean_leftovers, results_folder
from traces import Request, WorkloadSpec, build_workload

REPO = Path(__file__).resolve().parents[1]
RUN = ["compare", "--duration", "8", "--policies", "chunked:512,layered"]


def _dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _assert_whole_or_recognisably_not(parent: Path) -> None:
    """Every visible folder under `parent` is complete; every hidden entry is a leftover named
    as layersim names them, whose results folder (if any) says it is incomplete."""
    for p in parent.iterdir():
        if not p.name.startswith("."):
            assert (p / COMPLETE).is_file(), p
            check_complete(p)
            continue
        assert ".tmp-" in p.name or ".old-" in p.name, p
        inner = p / p.name[1:].rsplit(".", 1)[0]
        if ".tmp-" in p.name and inner.is_dir():
            with pytest.raises(ConfigError, match="incomplete"):
                check_complete(inner)


# ---- a finished folder -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "r"
    assert main([*RUN, "--out", str(out)]) == 0
    return out


def _listing(folder: Path) -> dict[str, dict[str, object]]:
    return json.loads((folder / COMPLETE).read_text())["files"]  # type: ignore[no-any-return]


def test_complete_lists_every_file_and_is_written_last(finished: Path) -> None:
    files = sorted(p.relative_to(finished).as_posix() for p in finished.rglob("*") if p.is_file())
    listing = _listing(finished)
    assert sorted(listing) == [f for f in files if f != COMPLETE]
    assert not (finished / INCOMPLETE).exists()
    assert {"run.json", "study.yaml", "report.html", "layered/metrics.json",
            "chunked_512/requests.parquet"} <= set(listing)
    assert listing["run.json"]["bytes"] == (finished / "run.json").stat().st_size
    check_complete(finished)


def test_rewritten_report_keeps_the_folder_complete(finished: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "r"
    shutil.copytree(finished, folder)
    assert report_main([str(folder), "--title", "another title"]) == 0
    assert "another title" in (folder / "report.html").read_text()
    check_complete(folder)
    assert _listing(folder)["report.html"]["bytes"] == (folder / "report.html").stat().st_size
    assert report_main([str(folder)]) == 0  # and again


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda d: (d / rel).unlink()


def _append(d: Path) -> None:
    with (d / "chunked_512" / "requests.parquet").open("ab") as f:
        f.write(b"x")


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "a listed file missing": (_remove("layered/metrics.json"), "layered/metrics.json is missing"),
    "a table changed": (_append, "chunked_512/requests.parquet changed after the run"),
    "another run's policy beside": (lambda d: shutil.copytree(d / "layered", d / "old_run"),
                                    "old_run/iterations.parquet is not from the run"),
    "still being written": (lambda d: (d / INCOMPLETE).write_text(""), "INCOMPLETE is present"),
    "no completion marker": (_remove(COMPLETE), "no COMPLETE marker"),
    "a damaged marker": (lambda d: (d / COMPLETE).write_text("{\"files\": 3"), "COMPLETE: damaged"),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_report_refuses_a_folder_that_is_not_whole(case: str, finished: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "r"
    shutil.copytree(finished, folder)
    (folder / "report.html").unlink()
    breaker, expected = BREAKAGES[case]
    breaker(folder)
    capsys.readouterr()
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err and str(folder) in err
    assert not (folder / "report.html").exists()


def test_report_refuses_the_temporary_folder_of_a_run(finished: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    inner = tmp_path / f".r.tmp-{_dead_pid()}" / "r"
    shutil.copytree(finished, inner)
    assert report_main([str(inner)]) == 2
    assert "temporary folder" in capsys.readouterr().err


def test_report_refuses_tables_of_another_run_or_without_metrics(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Folders a script wrote with SimResult.write (no markers): what mixes two runs shows."""
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    for seed in (1, 2):
        w = build_workload(WorkloadSpec("arxiv-long", rate=1.0, duration_s=8, seed=seed))
        simulate(w.requests, cm, "chunked:512").write(tmp_path / f"seed{seed}")
    assert len(load_results(tmp_path / "seed1").runs) == 1  # as written: fine
    shutil.copy(tmp_path / "seed2" / "chunked_512" / "requests.parquet",
                tmp_path / "seed1" / "chunked_512" / "requests.parquet")
    assert report_main([str(tmp_path / "seed1")]) == 2
    assert "from different runs" in capsys.readouterr().err
    (tmp_path / "seed2" / "chunked_512" / "metrics.json").unlink()
    with pytest.raises(ValueError, match="without its metrics.json"):
        load_results(tmp_path / "seed2")


# ---- leftovers of interrupted runs -------------------------------------------------------------
def test_leftovers_of_dead_processes_are_cleaned_and_nothing_else(tmp_path: Path) -> None:
    dead = _dead_pid()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        entries = {
            f".r.tmp-{dead}/r/a": "gone", f".r.tmp-{dead}/r/b/c": "gone",  # a killed --out run
            f".requests.parquet.tmp-{dead}": "gone",  # a killed atomic write
            f".q.old-{dead}/q/x": "gone",  # the previous folder, its replacement in place
            f".r.tmp-{alive.pid}/r/a": "kept",  # a run still going
            f".notes.tmp-{dead}/a": "kept", f".notes.tmp-{dead}/b": "kept",  # not our shape
            f".note.tmp-{dead}": None,  # an empty folder of ours: gone
            f"keep.tmp-{dead}/x": "kept",  # not hidden
            ".r.tmp-abc/r/a": "kept",  # no PID
            "q/COMPLETE": "kept",
            f".s.old-{dead}/s/run.json": "restored",  # moved aside, the new one never arrived
        }
        for rel, text in entries.items():
            path = tmp_path / rel
            if text is None:
                path.mkdir()
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        with results_folder(tmp_path / "new") as folder:
            (folder / "run.json").write_text("{}")
        left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
        assert left == sorted([rel for rel, text in entries.items() if text == "kept"]
                              + ["new/COMPLETE", "new/run.json", "s/run.json"])
        assert (tmp_path / "s" / "run.json").read_text() == "restored"
    finally:
        alive.kill()
        alive.wait()


# The stages a kill -9 can hit, each forced by a hook in a forked child that then kills itself.
_KILL_SCRIPT = r"""
import os, shutil, signal, sys
from pathlib import Path
import sim.results as R

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def fill(folder, text):
    (folder / "a").mkdir()
    (folder / "a" / "requests.parquet").write_text(text)
    (folder / "a" / "metrics.json").write_text(text)
    (folder / "run.json").write_text(text)

def hook(stage):
    if stage == "manifest":
        R.write_manifest = die
    elif stage == "swap":  # between moving the old folder aside and the new one into place
        rename, calls = Path.rename, []
        def second_rename_dies(self, target):
            if calls:
                die()
            calls.append(target)
            return rename(self, target)
        Path.rename = second_rename_dies
    elif stage == "drop_old":
        rmtree = shutil.rmtree
        def dies_on_old(path, *args, **kwargs):
            if ".old-" in str(path) and os.path.isdir(path) and os.listdir(path):
                die()
            return rmtree(path, *args, **kwargs)
        shutil.rmtree = dies_on_old

for stage in sys.argv[2:]:
    out = Path(sys.argv[1]) / stage / "r"
    out.parent.mkdir()
    with R.results_folder(out) as f:
        fill(f, "old")
    pid = os.fork()
    if pid == 0:
        hook(stage)
        with R.results_folder(out) as f:
            fill(f, "new")
            if stage == "writing":
                die()
        os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (stage, status)
"""

# What `r` holds right after the kill, then after the next write into the parent cleans up.
KILL_STAGES = {"writing": ("old", "old"), "manifest": ("old", "old"), "swap": (None, "old"),
               "drop_old": ("new", "new")}


def test_kill_9_at_each_stage_leaves_whole_folders_or_none(tmp_path: Path) -> None:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), *KILL_STAGES],
                   cwd=REPO, env=env, check=True, timeout=120)
    for stage, (after_kill, after_clean) in KILL_STAGES.items():
        parent = tmp_path / stage
        _assert_whole_or_recognisably_not(parent)
        assert [p.name for p in parent.iterdir() if p.name.startswith(".")], stage  # it left some
        out = parent / "r"
        assert (out / "run.json").read_text() == after_kill if after_kill else not out.exists()
        clean_leftovers(parent)
        assert sorted(p.name for p in parent.iterdir()) == ["r"], stage
        assert (out / "run.json").read_text() == after_clean
        check_complete(out)


@pytest.mark.slow
def test_kill_9_during_simulate_out(tmp_path: Path) -> None:
    """The real CLI killed at trigger points (and after seeded delays) while it writes --out."""
    out = tmp_path / "r"
    cmd = [sys.executable, "-c", "import sys; from cli.main import main; sys.exit(main(sys.argv[1:]))",
           "compare", "--duration", "8", "--policies", "chunked:512,layered,prefill-first"]

    def start(seed: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*cmd, "--seed", str(seed), "--out", str(out)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert start(1).wait(timeout=300) == 0
    rng = random.Random(20240611)
    triggers: list[Callable[[], bool]] = [
        lambda: any(tmp_path.glob(".r.tmp-*")),
        lambda: any(tmp_path.glob(".r.tmp-*/r/*/metrics.json")),
    ]  # not report.html: the marker and the rename follow it within microseconds, so a kill
    # that sees it often lands after the folder is whole (covered by the seeded delays below)
    for i, trigger in enumerate([*triggers, *([None] * 3)]):
        proc = start(2 + i)
        end = time.monotonic() + (rng.uniform(0.5, 8.0) if trigger is None else 300)
        fired = False
        while proc.poll() is None and time.monotonic() < end and not fired:
            fired = trigger is not None and trigger()
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        if fired:  # killed mid-write: its temp folder is left, and says so
            assert any(tmp_path.glob(".r.tmp-*")), i
        _assert_whole_or_recognisably_not(tmp_path)
    assert start(9).wait(timeout=300) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # leftovers gone
    check_complete(out)
    assert json.loads((out / "run.json").read_text())["setup"]["seed"] == 9
    assert report_main([str(out)]) == 0


# ---- what the columns count ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cm() -> CostModel:
    return CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))


@pytest.mark.parametrize("policy", ["chunked:512", "layered", "prefill-first"])
def test_prefill_tokens_count_each_prompt_token_once(policy: str, cm: CostModel) -> None:
    # prompt lengths not 1 past a chunk boundary (see the xfail below)
    reqs = [Request(i, 0.05 * i, 700 + 300 * i, 5 + i) for i in range(4)]
    res = simulate(reqs, cm, policy)
    req, it = res.requests, res.iterations
    assert req["finished"].all() and (req["preemptions"] == 0).all()
    assert int(it["prefill_tokens"].sum()) == int(req["prompt_tokens"].sum())
    assert int(it["prefill_layer_tokens"].sum()) == int(req["prompt_tokens"].sum()) * 48
    assert int(it["decode_tokens"].sum()) == int((req["output_tokens"] - 1).sum())


def test_a_one_token_final_prompt_chunk_is_prefill(cm: CostModel) -> None:
    """The cost model prices a prompt's last token run alone (whole stack, logits) as a decode;
    the iteration row books it as prefill (ReplicaState.prompt_tokens_as_decodes)."""
    for fast_forward in (False, True):
        res = simulate([Request(0, 0.0, 1025, 4)], cm, "chunked:512", fast_forward=fast_forward)
        it = res.iterations
        assert int(it["prefill_tokens"].sum()) == 1025 and int(it["decode_tokens"].sum()) == 3
        assert int(it["prefill_layer_tokens"].sum()) == 1025 * cm.model.num_layers
    # step by step, a row per chunk; fast-forwarded, the three chunks are one prefill stretch
    assert simulate([Request(0, 0.0, 1025, 4)], cm, "chunked:512", fast_forward=False
                    ).iterations["prefill_tokens"].tolist()[:3] == [512, 512, 1]
    assert it["prefill_tokens"].tolist()[0] == 1025 and it["iterations"].tolist()[0] == 3


def test_an_executors_own_row_is_rebooked_the_same_way() -> None:
    """The engine passes its own row (measured times, counted tokens): `rebooked` moves them."""
    row = {"prefill_tokens": 10, "decode_tokens": 5, "prefill_layer_tokens": 40, "energy_j": 1.0}
    rec = Recorder(num_layers=4)
    assert rec.rebooked(row, 0) is row
    assert rec.rebooked(row, 2) == {"prefill_tokens": 12, "decode_tokens": 3,
                                    "prefill_layer_tokens": 48, "energy_j": 1.0}


def test_output_tokens_are_those_emitted_and_max_tokens_those_asked(cm: CostModel) -> None:
    reqs = [Request(i, 0.05 * i, 300, 7) for i in range(3)]
    req = simulate(reqs, cm, "chunked:512").requests
    assert (req["max_tokens"] == 7).all() and (req["output_tokens"] == 7).all()


class _EndsRequestsEarly(ChunkedPrefill):
    """Cheats: tells every request it has asked for 2 tokens."""

    def schedule(self, state: ReplicaState):  # type: ignore[no-untyped-def]
        for r in (*state.waiting, *state.running):
            r.max_tokens = min(r.max_tokens, 2)
        return super().schedule(state)


def test_a_request_ended_early_is_seen(cm: CostModel) -> None:
    """Whether the executor refuses the policy or records it, the short requests show."""
    reqs = [Request(i, 0.05 * i, 300, 9) for i in range(3)]
    try:
        req = simulate(reqs, cm, _EndsRequestsEarly).requests
    except (PlanError, ConfigError):
        return  # refused: a policy may not change a request
    assert not req["finished"].any() and (req["output_tokens"] < req["max_tokens"]).all()


def test_recorder_counts_emitted_tokens_not_the_fields() -> None:
    """A request whose max_tokens was lowered (after 2 of 6 tokens) is short, not finished;
    TPOT divides by the tokens it got."""
    from policies.state import RequestState

    rec = Recorder(num_layers=4)
    r = RequestState(0, 0.0, 10, 6)
    r.first_token_s, r.finish_s, r.last_token_s = 1.0, 1.5, 1.5
    r.itl_s.append(0.5)
    r.num_output_tokens = r.max_tokens = 2
    rec.finished(r)
    row = rec.requests_frame().iloc[0]
    assert (row["max_tokens"], row["output_tokens"], bool(row["finished"])) == (6, 2, False)
    assert row["tpot_ms"] == pytest.approx(500.0)


def test_vllm_result_says_a_short_request_ended_early(cm: CostModel) -> None:
    from sim.vllm_result import SHORT, _error

    res = simulate([Request(0, 0.0, 300, 4)], cm, "chunked:512")
    row = next(res.requests.assign(finished=False).itertuples(index=False))
    assert _error(res, row) == f"{SHORT}: 4 of 4 tokens"
    rejected = pd.DataFrame([{**res.requests.iloc[0].to_dict(), "finish_s": float("nan")}])
    assert "not finished" in _error(res, next(rejected.itertuples(index=False)))
