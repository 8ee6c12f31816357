"""Results folders describe themselves, re-run to the same bytes, and never mix two runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli.main import main

RUN = ["compare", "--duration", "8", "--policies", "chunked:512,layered"]


def test_folder_records_what_produced_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert main([*RUN, "--seed", "3", "--slo-ttft-ms", "1500", "--out", str(out)]) == 0
    study = yaml.safe_load((out / "study.yaml").read_text())
    assert study["policies"] == ["chunked:512", "layered"] and study["seed"] == 3
    assert study["gpu"] == "h100" and study["dtype"] == "bfloat16" and study["routing_skew"] == 1.2
    run = json.loads((out / "run.json").read_text())
    assert run["command"][:2] == ["layersim", "compare"] and "--seed" in run["command"]
    setup = json.loads((out / "layered" / "metrics.json").read_text())["setup"]
    assert setup["model"] == "qwen3-30b-a3b" and setup["tp"] == 2 and setup["slo_ttft_ms"] == 1500
    assert setup["profile"]["label"].startswith("measured-kernel profile")
    assert setup["layersim_version"] == run["layersim_version"]


def test_study_in_the_folder_reruns_to_identical_bytes(tmp_path: Path) -> None:
    first, again = tmp_path / "a", tmp_path / "b"
    assert main([*RUN, "--out", str(first)]) == 0
    assert main(["compare", str(first / "study.yaml"), "--out", str(again)]) == 0
    for name in ("chunked_512/requests.parquet", "layered/iterations.parquet", "layered/metrics.json"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_reusing_a_results_folder_replaces_it_whole(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    assert main([*RUN, "--out", str(out)]) == 0
    assert main(["compare", "--duration", "8", "--policies", "prefill-first", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["prefill-first"]  # old runs gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main([*RUN, "--out", str(foreign)]) == 2
    assert "not a layersim results folder" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_capacity_folder_records_price_and_target(tmp_path: Path) -> None:
    out = tmp_path / "cap"
    assert main(["capacity", "--policies", "layered", "--duration", "8", "--num-requests", "6",
                 "--price-per-gpu-hour", "2.5", "--target", "0.8", "--out", str(out)]) in (0, 1)
    setup = json.loads((out / "capacity.json").read_text())["setup"]
    assert setup["price_per_gpu_hour"] == 2.5 and setup["target_attainment"] == 0.8
    assert (out / "study.yaml").is_file()


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("layersim ")


def test_report_in_a_results_folder_is_titled_with_its_name(tmp_path: Path) -> None:
    out = tmp_path / "myrun"
    assert main([*RUN, "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "myrun" in html and ".tmp-" not in html  # written in place of a temporary name


def test_study_yaml_names_files_absolutely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    out = tmp_path / "r"
    assert main(["compare", "--duration", "5", "--policies",
                 "examples/shortest_prompt_first.py:ShortestPromptFirst", "--out", str(out)]) == 0
    study = yaml.safe_load((out / "study.yaml").read_text())
    assert study["policies"] == [f"{repo}/examples/shortest_prompt_first.py:ShortestPromptFirst"]
    monkeypatch.chdir(tmp_path)  # re-runs from anywhere
    assert main(["compare", str(out / "study.yaml"), "--out", str(tmp_path / "again")]) == 0
