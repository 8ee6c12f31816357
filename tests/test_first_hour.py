"""A new user's first hour (issue 13, items 1 and 4), through `layersim` itself.

Item 1: a trace with timestamps replays its own arrivals unless a rate is given, `--speed`
works, and the header says which happened, with the trace's own rate and span. Expected
figures are computed here from the trace files, not from layersim's loaders.

Item 4: no request vanishes without a word: rejected and clipped requests are counted with
their reason in the table, the JSON and metrics.json; a run that can serve nothing is an error.
"""

from __future__ import annotations

import csv
import json
import re
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from cli.main import main
from core.admission import kv_blocks
from sim.study_file import make_study
from traces.workload import PACKAGED_DATA


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def workload_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("workload: "))


def table_row(out: str, title: str) -> list[str]:
    """The cells of one row of the comparison table (one per policy)."""
    lines = [line for line in out.splitlines() if line.startswith(title + "  ")]
    assert lines, f"no row {title!r} in\n{out}"
    return lines[0][len(title):].split()


def azure_arrivals() -> list[float]:
    """Seconds since the first request of the shipped azure-conv trace, sorted."""
    with (PACKAGED_DATA / "azure2023_conv.csv").open() as fh:
        stamps = sorted(datetime.fromisoformat(row["TIMESTAMP"].strip()[:26])
                        for row in csv.DictReader(fh))
    return [(t - stamps[0]).total_seconds() for t in stamps]


# ---------------------------------------------------------------- item 1: real traces replay

def test_readme_azure_example_replays_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    times = azure_arrivals()
    n, span = len(times), times[-1]
    assert (n, round(span / 60), f"{n / span:.1f}") == (19366, 58, "5.5")  # 3501.7 s
    code, out, _ = run(capsys, "compare", "--workload", "azure-conv", "--replicas", "8",
                       "--num-requests", "100000", "--policies", "layered")
    assert code == 0
    line = workload_line(out)
    assert "azure-conv" in line and "real arrivals replayed (x1), 5.5 req/s over 58 min" in line
    assert f"{n} requests" in line and "Poisson" not in line
    assert table_row(out, "requests finished") == [f"{n}/{n}"]
    # served as it arrived: throughput is the trace's own rate, not the study's default 1.3
    assert float(table_row(out, "throughput (req/s)")[0]) == pytest.approx(n / span, rel=0.01)


def test_speed_two_replays_twice_as_fast(capsys: pytest.CaptureFixture[str]) -> None:
    n = sum(t / 2 < 120 for t in azure_arrivals())  # the first 240 s of the trace
    code, out, err = run(capsys, "compare", "--workload", "azure-conv", "--speed", "2",
                         "--duration", "120", "--policies", "layered")
    assert code == 0, err
    assert (f"real arrivals replayed (x2), {n / 120:.1f} req/s over 120 s, {n} requests"
            in workload_line(out))
    assert table_row(out, "requests finished") == [f"{n}/{n}"]


def test_rate_redraws_arrivals_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compare", "--workload", "azure-conv", "--rate", "2",
                       "--duration", "30", "--policies", "layered")
    assert code == 0
    line = workload_line(out)
    assert "Poisson 2 req/s" in line and "own arrivals not replayed" in line
    assert "replayed (x" not in line
    code, _, err = run(capsys, "compare", "--workload", "azure-conv", "--rate", "2", "--speed", "2")
    assert code == 2 and "speed applies only when a trace replays its own arrivals" in err


def test_length_statistics_keep_the_default_rate(capsys: pytest.CaptureFixture[str]) -> None:
    for workload in ("sharegpt", "arxiv", "fixed:300:20"):
        code, out, _ = run(capsys, "compare", "--workload", workload, "--duration", "10",
                           "--policies", "layered")
        assert code == 0
        assert "Poisson 1.3 req/s" in workload_line(out) and " over 10 s" in workload_line(out)
    code, _, err = run(capsys, "compare", "--workload", "sharegpt", "--speed", "2")
    assert code == 2 and "'sharegpt' has none" in err


def _trace_files(tmp_path: Path) -> dict[str, tuple[Path, int, float]]:
    """One small trace per format: path, requests, span (s)."""
    burst = tmp_path / "burst.csv"
    rows = [f"{2 * i},s,0,ChatGPT,{100 + i},{10 + i},0,Conversation log" for i in range(11)]
    burst.write_text("Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,"
                     "Total tokens,Log Type\n" + "\n".join(rows) + "\n")
    moon = tmp_path / "moon.jsonl"
    moon.write_text("".join(json.dumps({"timestamp": 500 * i, "input_length": 200,
                                        "output_length": 8}) + "\n" for i in range(10)))
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2024-05-10 00:00:{4 * i:02d}.0000000+00:00,300,12\n" for i in range(8)))
    return {"BurstGPT": (burst, 11, 20.0), "Mooncake": (moon, 10, 4.5), "Azure": (azure, 8, 28.0)}


def test_trace_files_replay_their_own_arrivals(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    for kind, (path, n, span) in _trace_files(tmp_path).items():
        code, out, err = run(capsys, "compare", "--workload", str(path), "--policies", "layered")
        assert code == 0, err
        line = workload_line(out)
        rate = f"{n / span:.1f}" if n / span >= 0.95 else f"{n / span:.2g}"
        assert f"{kind} trace {path.name}: real arrivals replayed (x1), {rate} req/s over " \
               f"{span:.2g} s, {n} requests" in line, line
        assert table_row(out, "requests finished") == [f"{n}/{n}"]


def test_study_file_without_rate_replays(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    study.write_text("workload: azure-conv\nnum_requests: 40\npolicies: [layered]\n")
    code, out, _ = run(capsys, "compare", str(study))
    assert code == 0
    span = azure_arrivals()[39]
    assert f"real arrivals replayed (x1), {40 / span:.1f} req/s" in workload_line(out)
    assert f"over {span:.0f} s, 40 requests" in workload_line(out)


# ---------------------------------------------------------------- item 4: nothing vanishes

def test_mooncake_rejections_are_counted_everywhere(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    lines = (PACKAGED_DATA / "mooncake_synthetic.jsonl").read_text().splitlines()[:139]
    too_long = sum(json.loads(x)["input_length"] > 40960 for x in lines)  # qwen3's context
    assert too_long == 11
    args = ("compare", "--workload", "mooncake", "--rate", "1.3", "--num-requests", "139",
            "--policies", "chunked:512,layered")
    code, out, _ = run(capsys, *args, "--out", str(tmp_path / "res"))
    assert code == 0
    assert table_row(out, "requests finished") == ["128/139", "128/139"]
    assert table_row(out, "rejected (prompt > context)") == ["11", "11"]
    code, out, _ = run(capsys, *args, "--json")
    for metrics in [json.loads(x) for x in out.splitlines()] + [
            json.loads((tmp_path / "res" / p / "metrics.json").read_text())
            for p in ("chunked_512", "layered")]:
        assert metrics["rejected_prompt_over_context"] == 11
        assert metrics["rejected_prompt_output_over_context"] == 0
        assert metrics["unfinished"] == 11 and metrics["max_context"] == 40960


def test_kv_cache_rejections_name_their_reason(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    util = 0.05075  # just above the 5% activation reserve: a few hundred tokens of KV cache
    cm = make_study({"model": "tiny-moe", "gpu": "cpu"}).cost_model()
    blocks, _ = kv_blocks(cm, 16, util, 0.05 * cm.hw.hbm_bytes)
    assert 120 / 16 + 1 < blocks < 3500 / 16 - 1, blocks  # short prompts fit, long ones do not
    trace = tmp_path / "mixed.csv"
    trace.write_text("Timestamp,Request tokens,Response tokens\n" + "".join(
        f"{i},{3500 if i % 3 == 0 else 100},10\n" for i in range(9)))
    study = tmp_path / "study.yaml"
    study.write_text(f"model: tiny-moe\ngpu: cpu\nworkload: {trace}\npolicies: [layered]\n"
                     f"gpu_memory_utilization: {util}\n")
    code, out, _ = run(capsys, "compare", str(study))
    assert code == 0
    assert table_row(out, "requests finished") == ["6/9"]
    assert table_row(out, "rejected (KV cache too small)") == ["3"]


def test_nothing_servable_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "compare", "--workload", "fixed:100000:10", "--num-requests", "12")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "nothing can be served: all 12 requests are rejected (prompt > context: 12)" in err
    assert "40960" in err


def test_zero_requests_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "compare", "--rate", "0.01", "--duration", "1")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "the workload has no requests" in err


def test_clipped_prompts_are_described_as_simulated(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    code, out, _ = run(capsys, "compare", "--model", "tiny-moe", "--gpu", "cpu", "--duration", "30",
                       "--policies", "layered", "--out", str(tmp_path / "res"))
    assert code == 0
    req = pd.read_parquet(tmp_path / "res" / "layered" / "requests.parquet")
    total = req["prompt_tokens"] + req["output_tokens"]
    assert total.max() <= 4096  # tiny-moe's context
    clipped = int((total == 4096).sum())  # a clipped prompt fills the context exactly
    assert clipped > len(req) // 2
    line = workload_line(out)
    match = re.search(r"(\d+) of (\d+) prompts clipped to fit the model's context, simulated "
                      r"prompts median (\d+) / p90 (\d+) tokens", line)
    assert match, line
    assert [int(g) for g in match.groups()] == [
        clipped, len(req), round(req["prompt_tokens"].median()),
        round(req["prompt_tokens"].quantile(0.9))]
    assert table_row(out, "prompts clipped to context") == [str(clipped)]
    metrics = json.loads((tmp_path / "res" / "layered" / "metrics.json").read_text())
    assert metrics["clipped_prompts"] == clipped
