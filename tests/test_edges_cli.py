"""Edges of the command line and study files: sizes bounded before anything is allocated,
empty and non-finite values refused, policies that would share (or escape) a results folder
refused, and two property suites (generated study files, generated flag lists) that hold every
run to: exit 0 with finite metrics, or exit 2 with one line from one of layersim's own errors.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import cli.main
from costmodel.errors import ConfigError
from policies.state import PlanError
from sim.study import Study
from sim.study_file import make_study
from traces.errors import TraceError

OURS = (ConfigError, TraceError, PlanError)  # what a user's mistake may raise
TINY = ["--model", "tiny-moe", "--gpu", "cpu", "--workload", "fixed:64:4", "--num-requests", "3",
        "--rate", "5", "--policies", "chunked:512"]
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=80)


def run(*args: str) -> tuple[int, str, str, list[BaseException]]:
    """`layersim ARGS` in-process: exit code, stdout, stderr, and what the guard caught."""
    caught: list[BaseException] = []
    guard = cli.main._guard

    def recording(prog: str, fn: Any) -> int:
        def call() -> int:
            try:
                return int(fn())
            except BaseException as e:
                caught.append(e)
                raise
        return guard(prog, call)

    out, err = io.StringIO(), io.StringIO()
    cli.main._guard = recording
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")  # a user would see each one on stderr
            try:
                code = cli.main.main(list(args))
            except SystemExit as e:  # argparse's mistakes
                code = int(e.code or 0)
    finally:
        cli.main._guard = guard
    noise = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in warned)
    return code, out.getvalue(), noise + err.getvalue(), caught


def assert_sound(code: int, out: str, err: str, caught: list[BaseException]) -> None:
    """Exit 0 with finite metrics, or exit 2 with one line from one of our own errors."""
    assert code in (0, 2), (code, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert all(isinstance(e, OURS) for e in caught), repr(caught)
        return
    assert err == "", err  # --json: nothing but the metrics, no warning
    for line in out.splitlines():
        metrics = json.loads(line)
        for key, value in metrics.items():
            assert not isinstance(value, float) or math.isfinite(value), (key, value)
        # a run has a window and a rate: never null (an empty run is an error)
        assert metrics["duration_s"] is not None and metrics["duration_s"] >= 0, metrics
        assert metrics["request_throughput"] is not None, metrics


def refused(*args: str) -> str:
    code, out, err, caught = run(*args)
    assert code == 2 and out == "", (code, out, err)
    assert_sound(code, out, err, caught)
    return err


# ------------------------------------------------------------------- sizes bounded up front

@pytest.mark.parametrize("flags,needle", [
    (["--duration", "1e308"], "--duration: at most 1e+10 s"),
    (["--duration", "1e12"], "--duration: at most 1e+10 s"),
    (["--num-requests", "1000000000000"], "2,000,000 requests a run may generate"),
    (["--num-requests", "2000001"], "--num-requests: more than the 2,000,000 requests"),
    (["--workload", "fixed:99999999999999999999:5"], "at most 1,000,000,000 tokens"),
    (["--replicas", "1000000000"], "--replicas: at most 100,000 replicas"),
    (["--rate", "1e6", "--num-requests", "null"], "--rate: rate 1e+06 req/s over 120 s draws about"),
    (["--rate", "1e300", "--duration", "1e10"], "--rate: rate must be from 1e-10 req/s (one"),
    (["--rate", "100", "--duration", "1e9", "--num-requests", "null"], "--duration: rate 100"),
    (["--max-concurrency", "3", "--rate", "null", "--num-requests", "2000001"], "2,000,000"),
    (["--max-context", "100000000000000000000"], "--max-context: at most 1,000,000,000 tokens"),
    (["--workers", "1000"], "--workers: at most 256"),
    (["--seed", "99999999999999999999"], "--seed: at most"),
    (["--warmup-requests", "99999999999999999999"], "--warmup-requests: at most 2,000,000"),
    (["--stagger-s", "1e300", "--max-concurrency", "2", "--rate", "null"], "--stagger-s: at most"),
    (["--arrival", "gamma", "--cv", "1e-300"], "--cv: cv must be from 0.001 to 1000"),  # 1/cv^2
    (["--arrival", "gamma", "--cv", "1e300"], "--cv: cv must be from 0.001 to 1000"),  # overflow
])
def test_sizes_are_bounded_before_allocating(flags: list[str], needle: str) -> None:
    assert needle in refused("compare", *TINY, *flags)


def test_the_same_bounds_hold_in_study_files_and_make_study(tmp_path: Path) -> None:
    study = tmp_path / "s.yaml"
    study.write_text("num_requests: 1000000000000\n")
    assert f"{study}: key 'num_requests': more than the 2,000,000" in refused("compare", str(study))
    study.write_text("duration_s: 1.0e+12\nworkload: fixed:10:2\n")
    assert f"{study}: key 'duration_s': at most 1e+10 s" in refused("compare", str(study))
    with pytest.raises(ConfigError, match="key 'num_requests': more than the 2,000,000"):
        make_study({"num_requests": 10**20}, source="api")
    with pytest.raises(ConfigError, match="--replicas: at most 100,000"):
        make_study({"replicas": 10**9})
    # a replayed trace is bounded by its own file: a large cap stays valid (benchmarks/sim_speed.py)
    assert make_study({"workload": "azure-conv", "num_requests": 10**9}).num_requests == 10**9


@pytest.mark.parametrize("text,needle", [
    ("rate: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply (line 1;"),
    ("rate: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "nested too deeply"),
    ("seed: " + "9" * 5000 + "\n", "a number with more than 4300 digits"),
])
def test_pathological_study_files_are_one_line_naming_the_file(tmp_path: Path, text: str,
                                                               needle: str) -> None:
    study = tmp_path / "deep.yaml"
    study.write_text(text)
    err = refused("compare", str(study))
    assert str(study) in err and needle in err


def test_a_key_given_twice_is_refused_not_overwritten(tmp_path: Path) -> None:
    study = tmp_path / "twice.yaml"
    study.write_text("rate: 1\nseed: 3\n'rate': 2\n")
    assert f"{study}: key 'rate' given twice (lines 1 and 3)" in refused("compare", str(study))
    study.write_text("- rate\n- rate\n")  # a list, not keys: the mapping rule speaks
    assert f"{study}: a study file is a mapping of keys to values" in refused("compare", str(study))


def test_a_study_file_that_is_not_text_names_the_file(tmp_path: Path) -> None:
    study = tmp_path / "bin.yaml"
    study.write_bytes(b"rate: 2\n\xff\xfe\n")
    assert f"{study}: not UTF-8 text" in refused("compare", str(study))
    assert f"{tmp_path}: cannot read the study file" in refused("compare", str(tmp_path))


def test_an_error_quoting_a_newline_stays_one_line() -> None:
    assert "unknown model 'a\\nb'" in refused("compare", *TINY, "--model", "a\nb")
    assert "unrecognized arguments: a\\nb" in refused("compare", *TINY, "x.yaml", "a\nb")


# ------------------------------------------------------------------- values with no meaning

@pytest.mark.parametrize("flag", ["--gpu=", "--model=", "--workload=", "--router=", "--arrival=",
                                  "--profile=", "--dtype=", "--kv-cache-dtype= "])
def test_empty_strings_are_refused(flag: str) -> None:
    assert f"{flag.split('=')[0]}: empty" in refused("compare", *TINY, flag)


def test_empty_strings_are_refused_in_study_files(tmp_path: Path) -> None:
    study = tmp_path / "s.yaml"
    study.write_text("gpu: ''\n")
    assert f"{study}: key 'gpu': empty" in refused("compare", str(study))
    study.write_text("policies: [layered, '']\n")
    assert "an empty policy name" in refused("compare", str(study))
    assert "an empty policy name" in refused("compare", *TINY, "--policies", "layered,")


@pytest.mark.parametrize("flags,needle", [
    (["--slo-ttft-ms", "inf"], "--slo-ttft-ms: Input should be a finite number"),
    (["--slo-itl-ms", "nan"], "--slo-itl-ms: Input should be a finite number"),
    (["--goodput", "e2el:inf"], "--slo-e2el-ms: Input should be a finite number"),
    (["--duration", "inf", "--num-requests", "null"], "--duration: Input should be a finite"),
    (["--arrival", "gamma", "--cv", "inf"], "--cv: Input should be a finite number"),
    (["--rate", "nan"], "--rate"),
    (["--metric-percentiles", "50,nan"], "--metric-percentiles: Input should be a finite number (item 2)"),
    (["--metric-percentiles", "50,,99"], "--metric-percentiles: invalid comma-separated numbers"),
    (["--num-requests", "1e3"], "--num-requests: invalid int value: '1e3'"),
])
def test_non_finite_and_malformed_numbers_are_refused(flags: list[str], needle: str) -> None:
    assert needle in refused("compare", *TINY, *flags)


def test_runs_without_a_finite_arrival_are_refused() -> None:
    err = refused("compare", *TINY, "--rate", "5e-324")
    assert "--rate: rate must be from 1e-10 req/s (one request per 1e+10 s, the longest" in err
    err = refused("compare", *TINY, "--arrival", "gamma", "--cv", "2", "--rate", "1e-11")
    assert "--rate: rate must be from 1e-10 req/s" in err  # 1/(rate x shape) overflowed
    err = refused("compare", *TINY, "--rate", "1e-10")
    assert "rate 1e-10 req/s is too small: it puts arrivals at 5.31e+10 s, beyond the 1e+10 s" in err
    err = refused("compare", *TINY, "--num-requests", "null", "--duration", "1e-9")
    assert "the workload has no requests" in err
    err = refused("compare", *TINY, "--rate", "null", "--workload", "azure-conv", "--speed", "1e-300")
    assert "speed 1e-300 (the trace's span divided by it) puts arrivals at" in err
    err = refused("compare", *TINY, "--rate", "null", "--workload", "azure-conv", "--speed", "5e-324")
    assert "speed 4.94066e-324 (the trace's span divided by it) never gives a finite" in err


# ------------------------------------------------------------------- policies and their folders

NAMED = '''
from policies import ChunkedPrefill


class Named(ChunkedPrefill):
    def __init__(self) -> None:
        super().__init__(512)
        self.name = {name!r}
'''


@pytest.mark.parametrize("policies,needle", [
    ("chunked,chunked:512", "'chunked' and 'chunked:512' both make the policy 'chunked:512'"),
    ("adaptive:100,adaptive:1e2", "'adaptive:100' and 'adaptive:1e2' both make the policy"),
    ("layered:4,layered:04", "'layered:4' and 'layered:04' both make the policy 'layered:4'"),
])
def test_two_specs_of_one_policy_are_refused(policies: str, needle: str, tmp_path: Path) -> None:
    err = refused("compare", *TINY, "--policies", policies, "--out", str(tmp_path / "res"))
    assert needle in err
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("name,needle", [
    ("chunked:512", "'chunked:512' and '{file}:Named' both make the policy 'chunked:512'"),
    ("..", "policy name '..': a policy's name names its results folder"),
    (".", "policy name '.'"), ("", "policy name ''"), ("run.json", "policy name 'run.json'"),
    ("a\nb", "policy name 'a\\nb'"),
])
def test_user_policy_names_must_be_distinct_safe_folders(name: str, needle: str,
                                                         tmp_path: Path) -> None:
    file = tmp_path / "named.py"
    file.write_text(NAMED.format(name=name))
    out = tmp_path / "res"
    err = refused("compare", *TINY, "--policies", f"chunked:512,{file}:Named", "--out", str(out))
    assert needle.format(file=file) in err
    assert not out.exists() and not (tmp_path / "Named").exists()


def test_distinct_policies_still_write_their_folders(tmp_path: Path) -> None:
    code, _, err, _ = run("compare", *TINY, "--policies", "chunked:256,layered:4", "--json",
                          "--out", str(tmp_path / "res"))
    assert code == 0, err
    assert (tmp_path / "res" / "chunked_256").is_dir() and (tmp_path / "res" / "layered_4").is_dir()


# ------------------------------------------------------------------- explain

@pytest.mark.parametrize("flags,needle", [
    (["--decode", "100000000"], "--decode must be from 0 to 65,536"),
    (["--decode", "4", "--context", "10000000000"], "--context must be from 0 to 1,000,000,000"),
    (["--prefill", "99999999999999999999"], "--prefill must be from 0 to 1,000,000,000 tokens"),
    (["--decode", "4", "--gpu="], "--gpu: empty"),
    (["--decode", "4", "--prefill-layers", "0:3"], "describe a prefill tile: give --prefill N"),
])
def test_explain_flags_are_bounded(flags: list[str], needle: str) -> None:
    assert needle in refused("explain", *flags)


def test_explain_prices_the_largest_batch_allowed() -> None:
    code, out, err, _ = run("explain", "--model", "tiny-moe", "--gpu", "cpu", "--decode", "65536",
                            "--json")
    assert code == 0, err
    assert math.isfinite(json.loads(out)["latency_s"])


# ------------------------------------------------------------------- property suites

WEIRD: list[Any] = [None, True, False, "", " ", "x", "null", "1e308", "inf", 0, -1, 1, 2, 3,
                    10**20, -(10**20), 2**63, 0.5, -0.0, 1.5, math.nan, math.inf, -math.inf,
                    1e308, 5e-324, [], [1], ["chunked:512"], {"a": 1}, [[[]]], "a" * 300,
                    "a\nb", "../x", "fixed:64:4"]
VALID: dict[str, list[Any]] = {
    "model": ["tiny-moe"], "gpu": ["cpu", "h100"], "tp": [1, 2], "ep": [1, 2],
    "replicas": [1, 2, 3], "router": ["round-robin", "least-outstanding", "power-of-two"],
    "policies": [["chunked:512"], ["layered"], ["chunked:256", "layered:4"], ["prefill-first"],
                 ["chunked", "chunked:512"], ["adaptive:100", "adaptive:1e2"], ["hybrid:64"]],
    "workload": ["fixed:64:4", "fixed:100:1", "random:32:4:0.5", "fixed:5000:4", "sharegpt",
                 "tests/data/sharegpt_tiny.json", "TRACE"],  # TRACE: a small timed trace
    "rate": [0.5, 5, 20.0, "inf", 1e9, 1e-3, 1e-300], "arrival": ["poisson", "gamma", "fixed"],
    "cv": [0.5, 1.0, 2.0, 1e-3, 1e3, 1e-200, 1e200], "duration_s": [0.5, 2, 1e-9],
    "num_requests": [1, 3, 8],
    "speed": [1.0, 2.0, 1e-300, 1e300], "seed": [0, 7, 2**63 - 1], "max_context": [128, 4096, 40000],
    "slo_ttft_ms": [1, 2000.0, 1e-300], "slo_itl_ms": [0.1, 100, 1e300],
    "slo_tpot_ms": [None, 5.0, 5e-324], "slo_e2el_ms": [None, 1.0, 1e6],
    "metric_percentiles": [[50, 99.9], [1], [99, 99], [1e-300, 99.99999999]],
    "profile": [None, "datasheet"], "routing_skew": [None, 0, 5, 1e-300],
    "dtype": [None, "bf16", "fp8"],
    "expert_dtype": [None, "fp8"], "kv_cache_dtype": [None, "fp8"],
    "gpu_memory_utilization": [0.9, 0.3, 1, 1e-300], "block_size": [1, 16, 4096, 10**9],
    "max_num_seqs": [None, 1, 4, 2 * 10**6], "workers": [1], "max_concurrency": [None, 1, 3, 2 * 10**6],
    "warmup_requests": [None, 0, 1, 2, 2 * 10**6], "stagger_s": [None, 0.5, 1e-300, 1e9],
}
BASE = {"model": "tiny-moe", "gpu": "cpu", "workload": "fixed:64:4", "num_requests": 3,
        "rate": 5, "policies": ["chunked:512"]}


@st.composite
def study_texts(draw: st.DrawFn) -> str:
    """A study file: the tiny base with some keys set to a valid or a weird value, unknown keys,
    and now and then a deeply nested value or bytes that are not YAML at all."""
    study: dict[Any, Any] = dict(BASE)
    for key in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=5, unique=True)):
        pool = VALID[key] + (WEIRD if draw(st.integers(0, 3)) == 0 else [])
        study[key] = draw(st.sampled_from(pool))
    if draw(st.integers(0, 9)) == 0:
        study[draw(st.sampled_from(["rte", "max_num_seq", 3, "", "policies.0"]))] = 1
    text = yaml.safe_dump(study)
    tail = draw(st.sampled_from(["", "", "", "", "", "", "nested", "garbage", "cut"]))
    if tail == "nested":
        depth = draw(st.sampled_from([3, 40, 6000]))
        text += f"{draw(st.sampled_from(sorted(VALID)))}: {'[' * depth}{']' * depth}\n"
    elif tail == "garbage":
        text += draw(st.sampled_from(["\t: :\n", "- a\n", "key: [1\n", "&a [*a]\n", "? [a]\n: b\n"]))
    elif tail == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    return text


@PROPERTY
@given(text=study_texts(), command=st.sampled_from(["compare", "simulate"]))
def test_generated_study_files_run_or_fail_in_one_line(text: str, command: str,
                                                      tmp_path_factory: pytest.TempPathFactory
                                                      ) -> None:
    trace = tmp_path_factory.getbasetemp() / "trace.csv"  # BurstGPT's columns, 4 s apart
    trace.write_text("Timestamp,Request tokens,Response tokens\n" + "".join(
        f"{4 * i},{50 + i},{2 + i % 3}\n" for i in range(6)))
    path = tmp_path_factory.getbasetemp() / "generated.yaml"
    path.write_text(text.replace("TRACE", str(trace)))
    assert_sound(*run(command, str(path), "--json"))


NUMERIC = ["--" + key.replace("_", "-") for key, field in Study.model_fields.items()
           if "int" in str(field.annotation) or "float" in str(field.annotation)]
FLAGS = sorted({"--" + key.replace("_", "-") for key in Study.model_fields} - {
    "--duration-s", "--target", "--price-per-gpu-hour", "--start-rate"}) + [
    "--duration", "--goodput", "--check", "--bogus"]
NUMBERS = ["0", "1", "2", "3", "-1", "0.5", "1e308", "1e-9", "5e-324", "99999999999999999999",
           "nan", "inf", "null", "1e9", "2000001", "-5", "300", "1.5"]
WORDS = ["", " ", "null", "x", "chunked:512", "chunked,chunked:512", "..", "layered,layered:4",
         "chunked:256,", "ttft:5", "tbt:5", "e2el:1", "fixed:64:4", "fixed:0:1", "fixed:5000:4",
         "random:8:2:0.9", "gamma", "fixed", "least-outstanding", "fp8", "mxfp4", "h200",
         "datasheet", "a\nb", "50,99", "sharegpt"]


@st.composite
def flag_lists(draw: st.DrawFn) -> list[str]:
    """Up to four flags, each with a value of its own type mostly, any value now and then,
    written as `--flag value` or `--flag=value`."""
    argv: list[str] = []
    for flag in draw(st.lists(st.sampled_from(FLAGS), max_size=4)):
        pool = NUMBERS if flag in NUMERIC else WORDS
        value = draw(st.sampled_from(pool if draw(st.integers(0, 4)) else NUMBERS + WORDS))
        argv += [f"{flag}={value}"] if draw(st.booleans()) else [flag, value]
    return argv


@PROPERTY
@given(argv=flag_lists())
def test_generated_flag_lists_run_or_fail_in_one_line(argv: list[str]) -> None:
    assert_sound(*run("compare", *TINY, "--json", *argv))
