"""One name per setting: every study key is a flag with its default shown; no prefix matching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.flags import CAPACITY_ONLY, flag_name
from cli.main import main
from sim.study import Study
from sim.study_file import load_study


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def help_text(capsys: pytest.CaptureFixture[str], command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["simulate", "compare", "capacity"])
def test_every_study_key_is_a_flag_with_its_default(command: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, command)
    for key in Study.model_fields:
        if key in CAPACITY_ONLY and command != "capacity":
            assert flag_name(key) not in text
            continue
        assert flag_name(key) in text, key
    assert "--tp TP tensor-parallel GPUs per replica (default: 2)" in text
    assert "(default: 90,95,99)" in text and "--policy " not in text


def test_a_misspelled_flag_is_not_a_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--rat", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unrecognized arguments: --rat" in err
    assert len(err.strip().splitlines()) == 1


def test_policies_is_the_one_name_and_simulate_takes_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "simulate", "--policies", "layered", "--duration", "5")
    assert code == 0 and "layered" in out
    code, _, err = run(capsys, "simulate", "--policies", "chunked:512,layered", "--duration", "5")
    assert code == 2 and "takes one policy" in err


def test_new_keys_as_flags_equal_the_study_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "s.yaml"
    study.write_text("gpu_memory_utilization: 0.8\nblock_size: 32\nmax_context: 8000\n"
                     "max_num_seqs: 64\nslo_tpot_ms: 30\nmetric_percentiles: [50, 99.9]\n")
    import argparse

    from cli.simulate import add_parsers, study_from_args

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["compare", "--gpu-memory-utilization", "0.8", "--block-size", "32",
                            "--max-context", "8000", "--max-num-seqs", "64",
                            "--goodput", "tpot:30", "--metric-percentiles", "50,99.9"])
    assert study_from_args(ns) == load_study(study)


def test_goodput_and_percentiles_reach_the_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compare", "--json", "--duration", "20", "--policies", "chunked:512",
                       "--goodput", "ttft:100000", "e2el:1", "--metric-percentiles", "50,99.9")
    assert code == 0
    m = json.loads(out.splitlines()[0])
    assert m["slo_e2el_ms"] == 1 and m["slo_attainment"] == 0  # nobody finishes within 1 ms
    assert "p50_ttft_ms" in m and "p99.9_ttft_ms" in m and "p99_ttft_ms" in m  # vLLM's names
    code, _, err = run(capsys, "compare", "--goodput", "ttft:5", "--slo-ttft-ms", "6")
    assert code == 2 and "disagree" in err
    code, _, err = run(capsys, "compare", "--goodput", "tbt:5")
    assert code == 2 and "ttft:MS" in err


def test_max_num_seqs_limits_running_requests(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--json", "--policies", "chunked:512", "--workload", "fixed:100:50",
            "--rate", "50", "--duration", "1"]
    _, out, _ = run(capsys, *args)
    _, one, _ = run(capsys, *args, "--max-num-seqs", "1")
    # one request at a time: the others wait, so TTFT grows and throughput falls
    assert json.loads(one)["mean_ttft_ms"] > 5 * json.loads(out)["mean_ttft_ms"]


def test_goodput_targets_are_in_the_header_and_before_a_study_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "s.yaml"
    study.write_text("policies: [chunked:512]\nduration_s: 5\n")
    code, out, _ = run(capsys, "compare", "--goodput", "ttft:300", "tpot:6", str(study))
    assert code == 0
    assert "SLO: TTFT <= 300 ms, TPOT <= 6 ms and per-request P99 ITL <= 100 ms" in out


def test_null_flag_unsets_a_study_file_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "s.yaml"
    study.write_text("workload: azure-conv\nrate: 2\nnum_requests: 20\npolicies: [chunked:512]\n")
    code, out, _ = run(capsys, "compare", str(study))
    assert code == 0 and "own arrivals not replayed" in out
    code, out, _ = run(capsys, "compare", str(study), "--rate", "null")
    assert code == 0 and "real arrivals replayed" in out
