"""`layersim validate` end to end on the CPU: engine and simulator on the same arrivals.

The calibrated run is CI's end-to-end check (about 15 s on two idle cores): calibrate the CPU
quickly, validate tiny-moe under both policies, and require that every request finishes in both
executors, that layered prefill's measured expert traffic is below chunked's on long prompts,
and that every metric of engine.validate.CPU_BOUNDS is compared. Whether the timed metrics fall
within those bounds depends on how busy the machine is, so that check is marked `slow` (run it
with `pytest -m slow`, on an otherwise idle machine). The uncalibrated test checks the
no-profile path, bounding only what does not depend on timing: completion, the expert-traffic
order and expert bytes.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

pytest.importorskip("torch")

from engine.cli import validate_main  # noqa: E402
from engine.validate import CPU_BOUNDS, validate  # noqa: E402
from traces import WorkloadSpec  # noqa: E402

POLICIES = ["chunked:512", "layered"]
# Prompts of two chunks: chunked prefill loads every expert of every layer twice per prompt,
# layered prefill once.
LONG = WorkloadSpec("fixed:1024:8", rate=4.0, num_requests=3, seed=1, max_context=4096)


def _row(report: dict, policy: str, metric: str) -> dict:
    return next(r for r in report["rows"] if r["policy"] == policy and r["metric"] == metric)


def _check_common(report: dict) -> None:
    for pol in POLICIES:
        for side in ("engine", "sim"):
            m = report["runs"][pol][side]
            assert m["completed"] == m["num_requests"] == LONG.num_requests, (pol, side)
    ch = _row(report, "chunked:512", "expert_bytes_per_request")["measured"]
    la = _row(report, "layered", "expert_bytes_per_request")["measured"]
    assert la < ch


def test_validate_cpu_end_to_end(tmp_path):
    report = validate("tiny-moe", "cpu", None, POLICIES, LONG, tmp_path)
    _check_common(report)
    for pol in POLICIES:
        row = _row(report, pol, "expert_bytes_per_request")
        assert abs(row["rel_error"]) <= CPU_BOUNDS["expert_bytes_per_request"], row
        assert _row(report, pol, "energy_per_token_j")["measured"] is None  # not measured on CPU
        assert (tmp_path / pol.replace(":", "_") / "engine" / "iterations.parquet").is_file()
        assert (tmp_path / pol.replace(":", "_") / "sim" / "requests.parquet").is_file()
        tokens = pd.read_parquet(tmp_path / pol.replace(":", "_") / "engine" / "tokens.parquet")
        assert len(tokens) == LONG.num_requests * 8  # one timestamp per output token
        assert tokens.groupby("req_id")["time_s"].is_monotonic_increasing.all()
    saved = json.loads((tmp_path / "validation.json").read_text())
    assert len(saved["rows"]) == len(report["rows"]) and (tmp_path / "validation.csv").is_file()


def test_validate_cli_json_and_errors(tmp_path, capsys):
    argv = ["--model", "tiny-moe", "--device", "cpu", "--policies", "chunked:128,layered",
            "--workload", "fixed:200:3", "--rate", "50", "--num-requests", "2", "--json",
            "--out", str(tmp_path)]
    assert validate_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["policy"] for r in report["rows"]} == {"chunked:128", "layered"}
    assert validate_main(["--policies", "nope"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    for bad in (["--device", "tpu"], ["--workload", "fixed:64:4"], ["--rate", "x"]):
        assert validate_main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("layersim validate: error:") and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def calibrated_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from calibrate.run import run_calibration

    tmp = tmp_path_factory.mktemp("calibrated")
    profile = tmp / "cpu.json"
    run_calibration(model="tiny-moe", device="cpu", quick=True, out=profile)
    return validate("tiny-moe", "cpu", profile, POLICIES, LONG, tmp / "out")


def test_calibrated_validate_compares_every_bounded_metric(calibrated_report):
    # behaviour only: what the timed metrics come to depends on the machine's load
    _check_common(calibrated_report)
    for pol in POLICIES:
        for metric in CPU_BOUNDS:
            row = _row(calibrated_report, pol, metric)
            assert row["bound"] == CPU_BOUNDS[metric], row
            assert row["predicted"] is not None and row["predicted"] > 0, row
            assert row["measured"] is not None and row["measured"] > 0, row


@pytest.mark.slow
def test_calibrated_validate_within_bounds(calibrated_report):
    # timing-dependent: fails when the load changes between calibration and validation
    bad = [r for r in calibrated_report["rows"] if r["within"] is False]
    assert not bad, bad
    within = sum(r["within"] is True for r in calibrated_report["rows"])
    assert within >= len(CPU_BOUNDS) * len(POLICIES) - 2
