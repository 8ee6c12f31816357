"""Tests for the traces package: loaders, arrival processes, length samplers, workloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from traces import (
    LengthTable,
    LoadedTrace,
    TraceError,
    WorkloadSpec,
    arxiv_long,
    build_workload,
    fixed,
    gamma,
    load_azure,
    load_burstgpt,
    load_length_stats,
    load_mooncake,
    load_trace,
    parse_fixed,
    poisson,
)
from traces.workload import PACKAGED_DATA

DATA = PACKAGED_DATA  # the files shipped in the package; these tests never skip


def _arrays(trace: LoadedTrace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    reqs = trace.requests
    return (
        np.array([r.arrival_s for r in reqs]),
        np.array([r.prompt_tokens for r in reqs]),
        np.array([r.output_tokens for r in reqs]),
    )


def _cv(times: np.ndarray) -> float:
    gaps = np.diff(np.concatenate([[0.0], times]))
    return float(gaps.std() / gaps.mean())


# ---------------------------------------------------------------- real files


def test_azure_real_file_matches_readme() -> None:
    trace = load_azure(DATA / "azure2023_conv.csv")  # load time: benchmarks/trace_load.py
    assert len(trace.requests) == 19366
    assert trace.skipped_zero == 0
    t, p, o = _arrays(trace)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert [r.req_id for r in trace.requests] == list(range(19366))
    assert abs(p.mean() - 1155) < 2 and np.median(p) == 1020
    assert abs(np.percentile(p, 90) - 2735) < 2
    assert abs(o.mean() - 211) < 1 and np.median(o) == 129
    assert abs(len(t) / t[-1] - 5.53) < 0.01
    assert abs(t[-1] / 60 - 58) < 1
    assert abs(float(np.diff(t).std() / np.diff(t).mean()) - 1.09) < 0.01
    # 7-digit fraction kept: second row is 18:15:50.9951690 - 18:15:46.6805900
    assert trace.requests[1].arrival_s == pytest.approx(4.314579, abs=1e-7)


def test_mooncake_real_file_matches_readme() -> None:
    trace = load_mooncake(DATA / "mooncake_synthetic.jsonl")
    assert len(trace.requests) == 3993
    t, p, o = _arrays(trace)
    assert abs(p.mean() - 15325) < 2 and np.median(p) == 11587
    assert abs(o.mean() - 149) < 1
    assert abs(len(t) / t[-1] - 3.91) < 0.01
    assert abs(t[-1] - 1022) < 1


@pytest.mark.parametrize(
    ("name", "rows", "prompt_mean", "prompt_p50", "output_mean"),
    [
        ("sharegpt_8k_stats_llama2.csv", 30731, 2340, 1730, 439),
        ("arxiv_summarization_4k_stats_llama2.csv", 28257, 2588, 2730, 291),
    ],
)
def test_length_stats_real_files(
    name: str, rows: int, prompt_mean: float, prompt_p50: float, output_mean: float
) -> None:
    table = load_length_stats(DATA / name)
    assert len(table) == rows
    assert table.prompt_tokens.dtype.kind == "i"
    assert abs(table.prompt_tokens.mean() - prompt_mean) < 1
    assert np.median(table.prompt_tokens) == prompt_p50
    assert abs(table.output_tokens.mean() - output_mean) < 1


def test_load_trace_sniffs_real_files() -> None:
    assert isinstance(load_trace(DATA / "azure2023_conv.csv"), LoadedTrace)
    assert isinstance(load_trace(DATA / "mooncake_synthetic.jsonl"), LoadedTrace)
    assert isinstance(load_trace(DATA / "sharegpt_8k_stats_llama2.csv"), LengthTable)


# ---------------------------------------------------------------- fixtures in tmp_path

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
BURST_HEADER = (
    "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,"
    "Total tokens,Log Type\n"
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_azure_2024_offset_unsorted_and_zero_rows(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "azure2024.csv",
        AZURE_HEADER
        + "2024-05-10 00:00:01.5000000+00:00,100,10\n"
        + "2024-05-10 00:00:00.2500001+00:00,200,20\n"
        + "2024-05-10 00:00:02.0000000+00:00,0,20\n"
        + "2024-05-10 00:00:03.0000000+00:00,300,30\n",
    )
    trace = load_trace(path)
    assert isinstance(trace, LoadedTrace)
    assert trace.skipped_zero == 1
    assert [r.prompt_tokens for r in trace.requests] == [200, 100, 300]
    assert [r.arrival_s for r in trace.requests] == pytest.approx([0.0, 1.2499999, 2.7499999])
    assert [r.req_id for r in trace.requests] == [0, 1, 2]


def test_burstgpt_zero_rows_skipped_and_counted(tmp_path: Path) -> None:
    rows = [
        "5,1,2.0,ChatGPT,100,50,150,Conversation log",
        "6,1,1.0,ChatGPT,0,0,0,Conversation log",
        "7.5,2,3.0,GPT-4,200,0,200,API log",
        "9,3,1.5,GPT-4,300,30,330,API log",
    ]
    path = _write(tmp_path, "burst.csv", BURST_HEADER + "\n".join(rows) + "\n")
    for trace in (load_burstgpt(path), load_trace(path)):
        assert isinstance(trace, LoadedTrace)
        assert trace.skipped_zero == 2
        assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace.requests] == [
            (0.0, 100, 50),
            (4.0, 300, 30),
        ]


def test_burstgpt_without_optional_columns(tmp_path: Path) -> None:
    text = (
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "1,ChatGPT,10,5,15,Conversation log\n"
        "3,ChatGPT,20,6,26,Conversation log\n"
    )
    trace = load_trace(_write(tmp_path, "b.csv", text))
    assert isinstance(trace, LoadedTrace)
    assert [r.arrival_s for r in trace.requests] == [0.0, 2.0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n"
         "2023-11-16 18:15:47.0000000,abc,44\n",
         "azure.csv:3: ContextTokens is not an integer: 'abc'"),
        (AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n"
         "2023-11-16 18:15:47.0000000,374,-5\n",
         "azure.csv:3: GeneratedTokens is negative"),
        (AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n\n"
         "2023-11-16 18:15:47.0000000,374\n",
         "azure.csv:4: missing GeneratedTokens"),
        (AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\nyesterday,1,2\n",
         "azure.csv:3: TIMESTAMP is not a timestamp: 'yesterday'"),
        (AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n"
         "2023-11-16 18:15:47.0000000,3.5,44\n",
         "azure.csv:3: ContextTokens is not an integer: '3.5'"),
        (AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44,9\n",
         "azure.csv:2: expected 3 fields, saw 4"),
        (AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n"
         "2023-11-16 18:15:47.0000000,374,44,9\n",
         "azure.csv:3: expected 3 fields, saw 4"),
        ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,374\n",
         "azure.csv:1: missing column(s) GeneratedTokens"),
    ],
)
def test_azure_malformed_rows_name_file_and_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = _write(tmp_path, "azure.csv", text)
    with pytest.raises(TraceError) as info:
        load_azure(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_burstgpt_non_monotone_timestamp(tmp_path: Path) -> None:
    text = BURST_HEADER + "5,1,2,M,1,1,2,L\n4,1,2,M,1,1,2,L\n"
    with pytest.raises(TraceError, match=r"^burst\.csv:3: Timestamp goes backwards"):
        load_burstgpt(_write(tmp_path, "burst.csv", text))


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"timestamp": 0, "input_length": 5, "output_length": 2}', "{not json"],
         "mc.jsonl:2: invalid JSON"),
        (['{"timestamp": 0, "input_length": 5}'], "mc.jsonl:1: missing output_length"),
        (['{"timestamp": 0, "input_length": "5", "output_length": 2}'],
         "mc.jsonl:1: input_length is not an integer"),
        (['{"timestamp": 0, "input_length": 5, "output_length": -2}'],
         "mc.jsonl:1: output_length is negative"),
        (['{"timestamp": 10, "input_length": 5, "output_length": 2}',
          '{"timestamp": 3, "input_length": 5, "output_length": 2}'],
         "mc.jsonl:2: timestamp goes backwards"),
    ],
)
def test_mooncake_malformed_lines(tmp_path: Path, lines: list[str], expected: str) -> None:
    path = _write(tmp_path, "mc.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(TraceError) as info:
        load_mooncake(path)
    assert str(info.value).startswith(expected)


def test_mooncake_zero_rows_and_ms(tmp_path: Path) -> None:
    lines = [
        '{"timestamp": 1000, "input_length": 5, "output_length": 2, "hash_ids": [0]}',
        '{"timestamp": 1500, "input_length": 0, "output_length": 2, "hash_ids": []}',
        '{"timestamp": 3500, "input_length": 7, "output_length": 3, "hash_ids": [1, 2]}',
    ]
    trace = load_mooncake(_write(tmp_path, "mc.jsonl", "\n".join(lines) + "\n"))
    assert trace.skipped_zero == 1
    assert [r.arrival_s for r in trace.requests] == [0.0, 2.5]


def test_length_stats_malformed_and_zero(tmp_path: Path) -> None:
    header = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
    table = load_length_stats(_write(tmp_path, "ls.csv", header + "10,0,10,0\n5,3,8,1.6\n"))
    assert table.skipped_zero == 1 and table.prompt_tokens.tolist() == [5]
    bad = _write(tmp_path, "bad.csv", header + "10,2,12,5\n10,x,12,5\n")
    with pytest.raises(TraceError, match=r"^bad\.csv:3: num_decode_tokens is not an integer"):
        load_length_stats(bad)


def test_missing_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="nope.csv"):
        load_azure(tmp_path / "nope.csv")
    with pytest.raises(TraceError, match="nope.jsonl"):
        load_trace(tmp_path / "nope.jsonl")
    odd = _write(tmp_path, "odd.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(TraceError, match=r"^odd\.csv: unknown trace format"):
        load_trace(odd)


# ---------------------------------------------------------------- arrivals


def test_poisson_rate_and_cv() -> None:
    rng = np.random.default_rng(1)
    n = 200_000
    times = poisson(4.0, rng, n=n)
    assert len(times) == n and times[0] > 0 and np.all(np.diff(times) >= 0)
    rate = n / times[-1]
    assert abs(rate - 4.0) < 4.0 * 4 / np.sqrt(n)  # 4 sigma
    assert abs(_cv(times) - 1.0) < 0.02


@pytest.mark.parametrize("cv", [0.5, 2.0, 3.0])
def test_gamma_cv_and_rate(cv: float) -> None:
    times = gamma(2.0, cv, np.random.default_rng(2), n=200_000)
    assert abs(_cv(times) - cv) < 0.05 * cv
    assert abs(len(times) / times[-1] - 2.0) < 0.05


def test_gamma_cv1_is_poisson_and_fixed() -> None:
    a = gamma(3.0, 1.0, np.random.default_rng(5), n=100)
    b = poisson(3.0, np.random.default_rng(5), n=100)
    assert np.array_equal(a, b)
    f = fixed(4.0, None, duration_s=2.0)
    assert f.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert fixed(2.0, n=3).tolist() == [0.0, 0.5, 1.0]


def test_duration_cap_and_validation() -> None:
    times = poisson(10.0, np.random.default_rng(3), duration_s=100.0)
    assert times[-1] < 100.0 and abs(len(times) - 1000) < 5 * np.sqrt(1000)
    both = poisson(10.0, np.random.default_rng(3), n=50, duration_s=100.0)
    assert len(both) == 50
    with pytest.raises(TraceError, match="rate"):
        poisson(0.0, np.random.default_rng(0), n=5)
    with pytest.raises(TraceError, match="cv"):
        gamma(1.0, 0.0, np.random.default_rng(0), n=5)
    with pytest.raises(TraceError, match="cap"):
        poisson(1.0, np.random.default_rng(0))


# ---------------------------------------------------------------- lengths


def test_arxiv_long_quantiles() -> None:
    prompt, output = arxiv_long().sample(400_000, np.random.default_rng(7))
    assert abs(np.median(prompt) / 7059 - 1) < 0.03
    assert abs(np.percentile(prompt, 90) / 12985 - 1) < 0.03
    assert abs(np.median(output) / 208 - 1) < 0.03
    assert abs(np.percentile(output, 90) / 371 - 1) < 0.03
    assert prompt.min() >= 1 and output.min() >= 1
    assert (prompt + output).max() == 16384  # clipped so that prompt and output fit the context
    small, small_out = arxiv_long(max_context=8192).sample(10_000, np.random.default_rng(7))
    assert (small + small_out).max() == 8192


def test_fixed_lengths_parse() -> None:
    prompt, output = parse_fixed("fixed:512:64").sample(3, np.random.default_rng(0))
    assert prompt.tolist() == [512] * 3 and output.tolist() == [64] * 3
    for bad in ("fixed:512", "fixed:a:1", "fixed:0:5"):
        with pytest.raises(TraceError):
            parse_fixed(bad)


# ---------------------------------------------------------------- workloads


def test_workload_determinism_and_independent_streams() -> None:
    spec = WorkloadSpec("arxiv-long", rate=1.3, duration_s=120.0, seed=11)
    a, b = build_workload(spec), build_workload(spec)
    assert a == b and len(a.requests) > 100
    c = build_workload(WorkloadSpec("arxiv-long", rate=1.3, duration_s=120.0, seed=12))
    assert [r.arrival_s for r in c.requests] != [r.arrival_s for r in a.requests]
    assert [r.prompt_tokens for r in c.requests[:20]] != [r.prompt_tokens for r in a.requests[:20]]
    other = build_workload(WorkloadSpec("fixed:100:10", rate=1.3, duration_s=120.0, seed=11))
    assert [r.arrival_s for r in other.requests] == [r.arrival_s for r in a.requests]
    assert "arxiv-long" in a.description and "Poisson 1.3 req/s" in a.description
    assert f"{len(a.requests)} requests over 120 s" in a.description


def test_workload_caps_and_errors(tmp_path: Path) -> None:
    w = build_workload(WorkloadSpec("fixed:10:2", rate=5.0, num_requests=37))
    assert len(w.requests) == 37 and [r.req_id for r in w.requests] == list(range(37))
    w = build_workload(WorkloadSpec("fixed:10:2", rate=5.0, arrival="fixed", duration_s=3.0))
    assert len(w.requests) == 15 and w.requests[-1].arrival_s < 3.0
    with pytest.raises(TraceError, match="rate"):
        build_workload(WorkloadSpec("arxiv-long", num_requests=5))
    with pytest.raises(TraceError, match="duration_s and/or num_requests"):
        build_workload(WorkloadSpec("arxiv-long", rate=1.0))
    with pytest.raises(TraceError, match="sharegpt") as info:
        build_workload(WorkloadSpec(str(tmp_path / "no_such_workload"), rate=1.0))
    assert "arxiv-long" in str(info.value)
    with pytest.raises(TraceError, match="arrival"):
        WorkloadSpec("arxiv-long", rate=1.0, arrival="bursty")


def test_workload_from_burstgpt_path_replay_and_resample(tmp_path: Path) -> None:
    rows = [f"{i * 2},1,1,M,{10 + i},{5 + i},0,L" for i in range(10)]
    rows.insert(3, "5,1,1,M,0,0,0,L")
    path = _write(tmp_path, "burst.csv", BURST_HEADER + "\n".join(rows) + "\n")
    w = build_workload(WorkloadSpec(str(path)))
    assert w.skipped_zero == 1 and len(w.requests) == 10 and w.requests[-1].arrival_s == 18.0
    fast = build_workload(WorkloadSpec(str(path), speed=2.0, duration_s=5.0))
    assert [r.arrival_s for r in fast.requests] == [0.0, 1.0, 2.0, 3.0, 4.0]
    resampled = build_workload(WorkloadSpec(str(path), rate=100.0, num_requests=4))
    assert [r.prompt_tokens for r in resampled.requests] == [10, 11, 12, 13]
    assert resampled.requests[-1].arrival_s < 1.0


def test_named_workloads_and_speed() -> None:
    base = build_workload(WorkloadSpec("azure-conv"))
    fast = build_workload(WorkloadSpec("azure-conv", speed=2.0))
    assert len(base.requests) == len(fast.requests) == 19366
    assert fast.requests[-1].arrival_s == pytest.approx(base.requests[-1].arrival_s / 2)
    capped = build_workload(WorkloadSpec("azure-conv", duration_s=60.0, num_requests=10_000))
    in_first_minute = sum(r.arrival_s < 60.0 for r in base.requests)
    assert len(capped.requests) == in_first_minute and in_first_minute > 100
    assert capped.requests == base.requests[:in_first_minute]
    assert len(build_workload(WorkloadSpec("azure-conv", num_requests=50)).requests) == 50
    share = build_workload(WorkloadSpec("sharegpt", rate=2.0, num_requests=500, seed=3))
    assert len(share.requests) == 500 and share.description.startswith("sharegpt")
    arxiv = build_workload(WorkloadSpec("arxiv", rate=2.0, num_requests=500, seed=3))
    assert [r.arrival_s for r in arxiv.requests] == [r.arrival_s for r in share.requests]
    moon = build_workload(WorkloadSpec("mooncake", num_requests=100))
    assert len(moon.requests) == 100 and moon.requests[0].prompt_tokens == 40160
