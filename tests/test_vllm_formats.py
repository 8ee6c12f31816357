"""vLLM's benchmark formats: the random dataset, ShareGPT JSON, --request-rate inf and the
--save-result JSON (hand-computed on a constant-latency server)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from costmodel import ConfigError
from sim.cluster import simulate
from sim.study_file import load_study, make_study
from sim.vllm_result import UNFINISHED, _vllm_key, vllm_result, write_vllm_result
from tests.helpers import ConstantCost
from traces import (
    RandomLengths,
    TraceError,
    Workload,
    WorkloadSpec,
    build_workload,
    generate_arrivals,
    has_arrival_times,
    load_sharegpt,
    load_trace,
    parse_random,
)
from traces.request import Request
from traces.vllm_datasets import approx_tokens

SHAREGPT = Path(__file__).parent / "data" / "sharegpt_tiny.json"
D = 0.01  # seconds per iteration of ConstantCost


# ---- random dataset -----------------------------------------------------------------------
def test_random_bounds_follow_vllm_floor_and_ceil() -> None:
    assert parse_random("random:1024:128").bounds() == (1024, 1024, 128, 128)
    assert parse_random("random:1000:3:0.5").bounds() == (500, 1500, 1, 5)
    assert parse_random("random:10:1:0.25").bounds() == (7, 13, 1, 2)  # output low at least 1
    assert RandomLengths(100, 10, 0.3) == parse_random("random:100:10:0.3")


@pytest.mark.parametrize("spec, fragment", [
    ("random:1024", "random:INPUT:OUTPUT[:RATIO]"),
    ("random:1024:128:0.5:1", "random:INPUT:OUTPUT[:RATIO]"),
    ("random:abc:128", "integer lengths"),
    ("random:1024:0", "output length must be a positive integer"),
    ("random:1024:128:1", "range ratio must be in [0, 1)"),
    ("random:1024:128:-0.1", "range ratio must be in [0, 1)"),
    ("random:1:128:0.5", "empty prompts"),
])
def test_random_spec_errors_are_one_line(spec: str, fragment: str) -> None:
    with pytest.raises(TraceError, match=None) as err:
        build_workload(WorkloadSpec(spec, rate=1.0, num_requests=4))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_random_lengths_are_vllms_draws_for_the_seed() -> None:
    w = build_workload(WorkloadSpec("random:1024:128:0.5", rate=2.0, num_requests=50, seed=7))
    rng = np.random.default_rng(7)  # vLLM's RandomDataset: default_rng(seed), inputs then outputs
    assert [r.prompt_tokens for r in w.requests] == rng.integers(512, 1537, size=50).tolist()
    assert [r.output_tokens for r in w.requests] == rng.integers(64, 193, size=50).tolist()
    assert "vLLM random (range ratio 0.5): prompts uniform 512-1536" in w.description
    again = build_workload(WorkloadSpec("random:1024:128:0.5", rate=2.0, num_requests=50, seed=7))
    assert again == w
    # arrivals do not depend on the length source
    fixed = build_workload(WorkloadSpec("fixed:5:5", rate=2.0, num_requests=50, seed=7))
    assert [r.arrival_s for r in w.requests] == [r.arrival_s for r in fixed.requests]
    assert not has_arrival_times("random:1024:128")


def test_random_legacy_reads_the_ratio_as_the_older_benchmark_did() -> None:
    """benchmark_serving.py before vLLM moved it (and InferenceX's copy): randint(int(L*r), L+1)
    after np.random.seed(seed), all prompt lengths then all output lengths."""
    assert parse_random("random-legacy:1024:128:0.8").bounds() == (819, 1024, 102, 128)
    assert parse_random("random-legacy:10:3:0.35").bounds() == (3, 10, 1, 3)  # int() truncates
    assert parse_random("random-legacy:300:20:1").bounds() == (300, 300, 20, 20)  # 1: fixed
    w = build_workload(WorkloadSpec("random-legacy:1024:128:0.8", rate=2.0, num_requests=40,
                                    seed=5))
    old = np.random.RandomState(5)  # what the older script's np.random.seed(5) seeds
    assert [r.prompt_tokens for r in w.requests] == old.randint(819, 1025, size=40).tolist()
    assert [r.output_tokens for r in w.requests] == old.randint(102, 129, size=40).tolist()
    assert "older benchmark_serving.py random (range ratio 0.8): prompts uniform 819-1024" in (
        w.description)
    assert not has_arrival_times("random-legacy:1024:128:0.8")


@pytest.mark.parametrize(("spec", "fragment"), [
    ("random-legacy:1024:128", "random-legacy:INPUT:OUTPUT:RATIO"),
    ("random-legacy:1024:128:0", "must be in (0, 1]"),
    ("random-legacy:1024:128:1.5", "must be in (0, 1]"),
    ("random-legacy:1:128:0.5", "draw empty prompts: raise the length or the ratio"),
    ("random-legacy:1024:128:0.0001", "draw empty prompts: raise the length or the ratio"),
    ("random-legacy:1024:1:0.5", "draw empty outputs"),
    ("random-legacy:1024:3:0.3", "draw empty outputs"),
    ("random-legacy:x:3:0.3", "random-legacy workload needs integer lengths"),
])
def test_random_legacy_spec_errors_are_one_line(spec: str, fragment: str) -> None:
    with pytest.raises(TraceError) as err:
        build_workload(WorkloadSpec(spec, rate=1.0, num_requests=4))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_random_legacy_seeds_beyond_the_legacy_generator_are_one_line_errors() -> None:
    spec = "random-legacy:1024:128:0.8"
    assert build_workload(WorkloadSpec(spec, rate=1.0, num_requests=2, seed=2**32 - 1)).requests
    with pytest.raises(TraceError, match=r"seed must be in \[0, 2\*\*32\): --seed 4294967296"):
        build_workload(WorkloadSpec(spec, rate=1.0, num_requests=2, seed=2**32))


def test_random_without_ratio_is_fixed_lengths() -> None:
    w = build_workload(WorkloadSpec("random:300:20", rate=1.0, num_requests=5))
    assert {(r.prompt_tokens, r.output_tokens) for r in w.requests} == {(300, 20)}
    assert w.description.startswith("vLLM random: 300 prompt / 20 output tokens, Poisson 1 req/s")


# ---- ShareGPT JSON --------------------------------------------------------------------------
def test_sharegpt_filters_as_vllm_does() -> None:
    s = load_sharegpt(SHAREGPT)
    assert s.entries == 10
    # the 8 conversations with two turns, file order: (prompt, output) = ceil(UTF-8 bytes / 4)
    assert s.prompt_tokens.tolist() == [15, 1, 1055, 1001, 14, 12, 9, 9]
    assert s.output_tokens.tolist() == [8, 8, 8, 1100, 6, 12, 1, 19]
    # kept: English, gpt-first (vLLM takes the first two turns whoever speaks), Chinese, three
    # turns; skipped: prompt < 4, prompt > 1024, prompt + output > 2048, output < 4
    assert s.valid.tolist() == [True, False, False, False, True, True, False, True]
    assert "4 of 10 conversations pass vLLM's filters" in s.describe()
    assert "UTF-8 bytes / 4" in s.describe()
    assert approx_tokens("请用中文解释一下什么是机器学习。") == 12  # 16 characters, 48 bytes


def test_sharegpt_sample_is_vllms_shuffle_then_oversampling() -> None:
    s = load_sharegpt(SHAREGPT)
    order = list(range(8))
    random.seed(3)  # what vLLM's ShareGPTDataset does with --seed 3
    random.shuffle(order)
    valid = [i for i in order if s.valid[i]]
    prompt, output = s.sample_seeded(3, seed=3)
    assert prompt.tolist() == [int(s.prompt_tokens[i]) for i in valid[:3]]
    assert output.tolist() == [int(s.output_tokens[i]) for i in valid[:3]]
    random.seed(3)
    extra = [random.choice(valid) for _ in range(2)]
    prompt, _ = s.sample_seeded(6, seed=3)
    assert prompt.tolist() == [int(s.prompt_tokens[i]) for i in valid + extra]


def test_sharegpt_json_is_a_workload_path() -> None:
    assert isinstance(load_trace(SHAREGPT), type(load_sharegpt(SHAREGPT)))
    assert not has_arrival_times(str(SHAREGPT))
    w = build_workload(WorkloadSpec(str(SHAREGPT), rate=4.0, num_requests=20, seed=1))
    assert len(w.requests) == 20
    assert {(r.prompt_tokens, r.output_tokens) for r in w.requests} <= {
        (15, 8), (14, 6), (12, 12), (9, 19)}
    assert w.description.startswith("ShareGPT sharegpt_tiny.json: 4 of 10 conversations")
    assert "Poisson 4 req/s" in w.description
    with pytest.raises(TraceError, match="has no arrival times: give rate"):
        build_workload(WorkloadSpec(str(SHAREGPT), num_requests=5))


@pytest.mark.parametrize("text, message", [
    ('[{"conversations": []', "bad.json:1: invalid JSON"),
    ('{"conversations": []}', "bad.json: expected a JSON list of conversations"),
    ('[\n"just text"\n]', "bad.json: entry 0: expected an object with 'conversations'"),
    ('[{"conversations": []}, {"id": "x"}]', "bad.json: entry 1: 'conversations' is missing"),
    ('[{"conversations": "hello"}]', "bad.json: entry 0: 'conversations' is not a list"),
    ('[{"conversations": [{"from": "human"}, {"value": "hi"}]}]',
     "bad.json: entry 0: conversations[0] has no text 'value'"),
    ('[{"conversations": [{"value": "a long enough question"}, {"value": 42}]}]',
     "bad.json: entry 0: conversations[1] has no text 'value'"),
    ('[{"conversations": [{"value": "Hi"}, {"value": "Hello there, friend"}]}]',
     "bad.json: none of its 1 entries passes vLLM's ShareGPT filters"),
])
def test_malformed_sharegpt_is_one_line_naming_file_and_entry(
        tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TraceError) as err:
        build_workload(WorkloadSpec(str(path), rate=1.0, num_requests=2))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_json_file_of_mooncake_rows_is_still_mooncake(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5}\n'
                    '{"timestamp": 500, "input_length": 20, "output_length": 6}\n')
    trace = load_trace(path)
    assert [r.prompt_tokens for r in trace.requests] == [10, 20]  # type: ignore[union-attr]


# ---- --request-rate inf ---------------------------------------------------------------------
def test_rate_inf_sends_everything_at_time_zero() -> None:
    rng = np.random.default_rng(0)
    for kind in ("poisson", "gamma", "fixed"):
        assert generate_arrivals(kind, math.inf, rng, cv=2.0 if kind == "gamma" else 1.0,
                                 n=4).tolist() == [0.0] * 4
    w = build_workload(WorkloadSpec("random:100:10", rate=math.inf, num_requests=6))
    assert [r.arrival_s for r in w.requests] == [0.0] * 6
    assert w.description == ("vLLM random: 100 prompt / 10 output tokens, all at once (rate inf), "
                             "6 requests at t = 0")
    trace = build_workload(WorkloadSpec("azure-conv", rate=math.inf, num_requests=3))
    assert [r.arrival_s for r in trace.requests] == [0.0] * 3
    assert "all at once (rate inf)" in trace.description
    with pytest.raises(TraceError, match="rate inf sends every request at once: give num_requests"):
        build_workload(WorkloadSpec("fixed:100:10", rate=math.inf, duration_s=60.0))


def test_study_rate_inf_from_yaml_and_flags(tmp_path: Path) -> None:
    for text in ("rate: .inf\n", "rate: inf\n", "rate: Infinity\n"):
        path = tmp_path / "s.yaml"
        path.write_text(text)
        assert load_study(path).rate == math.inf
    assert make_study({"rate": float("inf")}).rate == math.inf
    assert make_study({"rate": "inf"}).rate == math.inf
    with pytest.raises(ConfigError, match="--rate: Input should be a valid number"):
        make_study({"rate": "fast"})
    study = make_study({"rate": "inf", "workload": "fixed:100:10"})  # no num_requests
    with pytest.raises(ConfigError, match="rate inf sends every request at once"):
        study.build_workload(4096)
    study = make_study({"rate": "inf", "workload": "fixed:100:10", "num_requests": 5})
    assert [r.arrival_s for r in study.build_workload(4096).requests] == [0.0] * 5


def test_simulator_serves_requests_that_all_arrive_at_once() -> None:
    """Three 64-token prompts at t=0 share the first iteration (192 <= 512 tokens), so each
    first token comes at D, and the one decode step after it ends every request at 2D."""
    reqs = [Request(i, 0.0, 64, 2) for i in range(3)]
    study = make_study({"model": "tiny-moe", "rate": "inf", "workload": "fixed:64:2",
                        "num_requests": 3})
    result = simulate(reqs, ConstantCost(D), "chunked:512")
    doc = vllm_result(study, result, Workload(tuple(reqs), 0, "three at once"))
    assert doc["request_rate"] == "inf"
    assert doc["ttfts"] == pytest.approx([D] * 3)
    assert [g for gaps in doc["itls"] for g in gaps] == pytest.approx([D] * 3)
    assert doc["latencies"] == pytest.approx([2 * D] * 3)
    assert doc["max_concurrent_requests"] == 3
    assert doc["max_output_tokens_per_s"] == 6.0


# ---- --save-result JSON -----------------------------------------------------------------------
def test_save_result_json_by_hand(tmp_path: Path) -> None:
    """One request at a time on a server whose every iteration takes D: TTFT = D and every
    gap is D; the third prompt exceeds tiny-moe's 4,096-token context and is rejected."""
    reqs = [Request(0, 0.0, 64, 3), Request(1, 100.0, 64, 2), Request(2, 200.0, 5000, 2)]
    study = make_study({"model": "tiny-moe", "rate": 0.01, "workload": "fixed:64:3",
                        "arrival": "gamma", "cv": 2.0, "num_requests": 3})
    result = simulate(reqs, ConstantCost(D), "chunked:512")
    doc = vllm_result(study, result, Workload(tuple(reqs), 0, "hand-made"))
    assert doc["date"] is None and doc["tokenizer_id"] is None and doc["max_concurrency"] is None
    assert (doc["backend"], doc["label"], doc["model_id"]) == ("layersim", "chunked:512", "tiny-moe")
    assert (doc["num_prompts"], doc["request_rate"], doc["burstiness"]) == (3, 0.01, 0.25)
    assert (doc["completed"], doc["failed"]) == (2, 1)
    assert doc["input_lens"] == [64, 64, 5000]
    assert doc["output_lens"] == [3, 2, 0]
    assert doc["ttfts"] == pytest.approx([D, D, 0.0])
    assert len(doc["itls"][0]) == 2 and doc["itls"][0] == pytest.approx([D, D])
    assert len(doc["itls"][1]) == 1 and doc["itls"][1] == pytest.approx([D])
    assert doc["itls"][2] == []
    assert doc["latencies"] == pytest.approx([3 * D, 2 * D, 0.0])
    assert doc["start_times"] == [0.0, 100.0, 200.0]
    assert doc["generated_texts"] == ["", "", ""]
    assert doc["errors"] == ["", "", "rejected: prompt > context"]
    assert doc["total_input_tokens"] == 128 and doc["total_output_tokens"] == 5
    assert doc["duration"] == pytest.approx(100 + 2 * D)
    assert doc["max_output_tokens_per_s"] == 3.0 and doc["max_concurrent_requests"] == 1
    assert doc["mean_ttft_ms"] == pytest.approx(D * 1e3)
    assert doc["p99_itl_ms"] == pytest.approx(D * 1e3)
    assert {"median_tpot_ms", "std_e2el_ms", "p90_ttft_ms", "request_goodput"} <= doc.keys()
    path = write_vllm_result(tmp_path / "r.json", doc)
    assert json.loads(path.read_text()) == doc  # strict JSON: no NaN, no Infinity


def test_vllm_names_fractional_percentiles_with_a_dot() -> None:
    assert _vllm_key("p99_9_ttft_ms") == "p99.9_ttft_ms"
    assert _vllm_key("p90_itl_ms") == "p90_itl_ms"
    assert _vllm_key("median_e2el_ms") == "median_e2el_ms"


def test_per_request_itls_survive_worker_processes() -> None:
    reqs = [Request(i, 0.05 * i, 32 + i, 3 + i % 4) for i in range(12)]
    one = simulate(reqs, ConstantCost(D), "chunked:512", num_replicas=2)
    two = simulate(reqs, ConstantCost(D), "chunked:512", num_replicas=2, workers=2)
    assert one.itls is not None and two.itls is not None
    ids = list(range(12))
    a, b = one.itls.per_request(ids), two.itls.per_request(ids)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [len(x) for x in a] == [3 + i % 4 - 1 for i in ids]


def test_streamed_run_keeps_no_per_request_itls(tmp_path: Path) -> None:
    reqs = [Request(0, 0.0, 64, 3)]
    result = simulate(reqs, ConstantCost(D), "chunked:512", stream_dir=tmp_path)
    assert result.itls is None
    with pytest.raises(ValueError, match="per-request ITLs were not kept"):
        vllm_result(make_study({"model": "tiny-moe"}), result, Workload(tuple(reqs), 0, "x"))
    assert UNFINISHED.startswith("not finished")


def test_multi_seed_runs_check_the_legacy_seed_range_before_they_start(capsys) -> None:
    from cli.main import main
    from traces.vllm_datasets import check_legacy_seeds

    check_legacy_seeds("random-legacy:64:8:0.5", 2**32 - 2, 2)  # the last is 2**32 - 1: fine
    with pytest.raises(TraceError, match="reaches 4294967296"):
        check_legacy_seeds("random-legacy:64:8:0.5", 2**32 - 1, 2)
    check_legacy_seeds("random:64:8:0.5", 2**32 - 1, 2)  # vLLM's generator takes any seed
    assert main(["capacity", "--workload", "random-legacy:64:8:0.5", "--seed", str(2**32 - 1),
                 "--seeds", "2", "--duration", "10"]) == 2
    got = capsys.readouterr()
    assert "--seed 4294967295 with 2 seeds reaches 4294967296" in got.err
    assert "seed 4294967295" not in got.out  # refused before the first seed's search
