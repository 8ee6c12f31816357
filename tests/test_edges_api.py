"""Edges of the Python API: `sim.simulate` checks its requests and arguments as the CLI checks a
study (a one-line ConfigError naming the argument, and for a request its position and id), and
`make_study` bounds what the study keys bound; a property suite calls both with generated
arguments and holds every call to: a result with finite metrics, or one of our one-line errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from costmodel.errors import ConfigError
from policies.state import PlanError
from sim import simulate
from sim.cluster import SimResult
from sim.run import run_study
from sim.study_file import make_study
from tests.helpers import ConstantCost
from traces.errors import TraceError
from traces.request import Request
from traces.workload import WorkloadSpec, build_workload

COST = ConstantCost(0.01)
OURS = (ConfigError, TraceError, PlanError)
GOOD = [Request(0, 0.0, 64, 3), Request(1, 0.5, 32, 2)]


def one_line_error(call: Any) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    text = str(info.value)
    assert len(text.splitlines()) == 1, text
    return text


@pytest.mark.parametrize("bad,needle", [
    (Request(1, 0.0, 0, 3), "requests[1] (req_id 1): prompt_tokens must be an integer from 1 to"),
    (Request(1, 0.0, -5, 3), "prompt_tokens must be an integer from 1 to 1,000,000,000, got -5"),
    (Request(1, 0.0, 1.5, 3), "prompt_tokens must be an integer from 1 to 1,000,000,000, got 1.5"),
    (Request(1, 0.0, True, 3), "prompt_tokens must be an integer"),
    (Request(1, 0.0, 10**20, 3), "prompt_tokens must be an integer"),
    (Request(1, 0.0, "64", 3), "got '64'"),
    (Request(1, 0.0, 64, 0), "requests[1] (req_id 1): output_tokens must be an integer"),
    (Request(1, 0.0, 64, 2.5), "output_tokens must be an integer"),
    (Request(1, math.nan, 64, 3), "requests[1] (req_id 1): arrival_s must be a number of seconds"),
    (Request(1, math.inf, 64, 3), "arrival_s must be a number of seconds from 0 to 1e+10, got inf"),
    (Request(1, -1.0, 64, 3), "arrival_s must be a number of seconds from 0 to 1e+10, got -1.0"),
    (Request(1, "0", 64, 3), "arrival_s must be a number"),
    (Request(0, 1.0, 64, 3), "requests[1] (req_id 0): req_id repeats an earlier request's"),
    (Request(1.0, 1.0, 64, 3), "requests[1]: req_id must be a 64-bit integer, got 1.0"),
    (Request("a", 1.0, 64, 3), "requests[1]: req_id must be a 64-bit integer, got 'a'"),
    (Request(2**64, 1.0, 64, 3), "req_id must be a 64-bit integer"),
    ((1, 0.0, 64, 3), "requests[1] is not a traces.Request"),
])
def test_simulate_checks_each_request(bad: Any, needle: str) -> None:
    assert needle in one_line_error(lambda: simulate([GOOD[0], bad], COST, "chunked:512"))


@pytest.mark.parametrize("requests,needle", [
    ([], "requests is empty"), (None, "requests must be a sequence"),
    (5, "requests must be a sequence"), ("abc", "requests must be a sequence"),
])
def test_simulate_needs_a_sequence_of_requests(requests: Any, needle: str) -> None:
    assert needle in one_line_error(lambda: simulate(requests, COST, "chunked:512"))


@pytest.mark.parametrize("kwargs,needle", [
    ({"num_replicas": 0}, "num_replicas must be an integer from 1 to 100,000, got 0"),
    ({"num_replicas": 10**9}, "num_replicas must be an integer from 1 to 100,000"),
    ({"num_replicas": 1.5}, "num_replicas must be an integer"),
    ({"num_replicas": True}, "num_replicas must be an integer"),
    ({"seed": -1}, "seed must be an integer from 0 to"),
    ({"block_size": 0}, "block_size must be an integer from 1 to"),
    ({"workers": 1000}, "workers must be an integer from 1 to 256"),
    ({"max_concurrency": 0}, "max_concurrency must be an integer >= 1, got 0"),
    ({"warmup_requests": -1}, "warmup_requests must be an integer from 0 to"),
    ({"slo_ttft_ms": math.nan}, "slo_ttft_ms must be a positive finite number of ms, got nan"),
    ({"slo_itl_ms": math.inf}, "slo_itl_ms must be a positive finite number of ms, got inf"),
    ({"slo_tpot_ms": 0}, "slo_tpot_ms must be a positive finite number"),
    ({"slo_ttft_ms": None}, "slo_ttft_ms must be a positive finite number"),
    ({"gpu_memory_utilization": math.nan}, "gpu_memory_utilization must be in (0, 1], got nan"),
    ({"activation_reserve_bytes": math.inf}, "activation_reserve_bytes must be a finite number"),
    ({"metric_percentiles": [50, math.nan]}, "metric_percentiles must be between 0 and 100"),
    ({"metric_percentiles": "99"}, "metric_percentiles must be a list of numbers"),
    ({"router": 5}, "router must be a router's name"),
    ({"router": "random"}, "unknown router 'random'"),
])
def test_simulate_checks_its_arguments(kwargs: dict[str, Any], needle: str) -> None:
    assert needle in one_line_error(lambda: simulate(GOOD, COST, "chunked:512", **kwargs))


def test_a_policy_must_be_a_spec_or_a_factory() -> None:
    assert "policy must be a spec or a callable" in one_line_error(lambda: simulate(GOOD, COST, 5))


def test_numpy_numbers_are_valid_requests() -> None:
    reqs = [Request(np.int64(i), np.float64(0.1 * i), np.int64(40), np.int32(3)) for i in range(3)]
    result = simulate(reqs, COST, "chunked:512")
    assert result.metrics["completed"] == 3


def test_a_result_folder_name_is_checked_where_it_is_written(tmp_path: Path) -> None:
    result = simulate(GOOD, COST, "chunked:512")
    escaping = SimResult("..", result.metrics, result.requests, result.iterations)
    assert "policy name '..'" in one_line_error(lambda: escaping.write(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert result.write(tmp_path / "out").name == "chunked_512"


@pytest.mark.parametrize("values,needle", [
    ({"num_requests": 10**20}, "--num-requests: more than the 2,000,000 requests"),
    ({"rate": 1e6}, "--rate: rate 1e+06 req/s over 120 s draws about 1.2e+08 requests"),
    ({"gpu": ""}, "--gpu: empty"),
    ({"policies": "chunked:512,"}, "--policies: an empty policy name"),
    ({"metric_percentiles": []}, "--metric-percentiles"),
    ({"seed": 2**64}, "--seed: at most"),
    ({"arrival": "poisson", "cv": 2.0}, "--cv: cv applies only to arrival gamma"),
    ([("rate", 2)], "flags: a study is a mapping of keys to values, got list"),
])
def test_make_study_bounds_its_keys(values: Any, needle: str) -> None:
    assert needle in one_line_error(lambda: make_study(values))


@pytest.mark.parametrize("key,value,needle", [
    ("model", "m" * 300, "model 'mmmm"), ("gpu", "g" * 300, "gpu 'gggg"),
    ("profile", "p" * 300, "File name too long"), ("profile", "a\0b", "profile 'a\\x00b'"),
])
def test_a_name_no_file_can_have_is_the_keys_mistake(key: str, value: str, needle: str) -> None:
    study = make_study({"model": "tiny-moe", "gpu": "cpu", "workload": "fixed:8:2",
                        "num_requests": 2, key: value})
    assert needle in one_line_error(lambda: run_study(study))


@pytest.mark.parametrize("spec,needle", [
    ({"rate": 1e10, "num_requests": 3}, "rate must be from 1e-10 req/s (one request per 1e+10"),
    ({"rate": 1.0, "duration_s": 1e11}, "duration_s must be at most 1e+10 s"),
    ({"rate": 1.0, "num_requests": 10**8}, "num_requests: more than the 2,000,000 requests"),
    ({"rate": 1e6, "duration_s": 1e3}, "rate x duration_s: rate 1e+06 req/s over 1000 s draws"),
    ({"rate": 1.0, "num_requests": 3, "arrival": "gamma", "cv": 1e-300}, "cv must be from 0.001"),
    ({"rate": 5e-324, "num_requests": 3}, "rate must be from 1e-10 req/s"),
    ({"rate": 1e-10, "num_requests": 3}, "rate 1e-10 req/s is too small: it puts arrivals at"),
    ({"workload": "azure-conv", "speed": 1e-300, "num_requests": 3}, "speed 1e-300 (the trace's"),
    ({"workload": "x" * 5000, "rate": 1.0, "num_requests": 3}, "unknown workload 'xxxx"),
    ({"workload": "~no-such-user-here/t.csv", "rate": 1.0, "num_requests": 3}, "unknown workload"),
])
def test_build_workload_bounds_what_it_generates(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(TraceError) as info:
        build_workload(WorkloadSpec(**{"workload": "fixed:8:2", **spec}))
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1


# ------------------------------------------------------------------- property suite

NUMBERS: list[Any] = [0, 1, 2, 3, 64, -1, 10**20, 2**63, 0.5, 1.5, -0.0, math.nan, math.inf,
                      -math.inf, 1e308, 5e-324, 1e10, True, None, "1", np.int64(5),
                      np.float64(2.0)]
SMALL_OK = [0, 1, 2, 3, 64, 500, 5000]


@st.composite
def requests(draw: st.DrawFn) -> list[Any]:
    """A few requests: mostly valid ones, a field now and then drawn from NUMBERS."""
    out: list[Any] = []
    for i in range(draw(st.integers(0, 4))):
        fields: list[Any] = [i, float(draw(st.sampled_from(SMALL_OK))) / 10,
                             draw(st.sampled_from(SMALL_OK[1:])), draw(st.sampled_from([1, 2, 9]))]
        if draw(st.integers(0, 3)) == 0:
            fields[draw(st.integers(0, 3))] = draw(st.sampled_from(NUMBERS))
        out.append(Request(*fields) if draw(st.integers(0, 15)) else tuple(fields))
    return out


KWARGS = ["num_replicas", "router", "seed", "block_size", "gpu_memory_utilization",
          "activation_reserve_bytes", "slo_ttft_ms", "slo_itl_ms", "slo_tpot_ms", "slo_e2el_ms",
          "metric_percentiles", "workers", "max_concurrency", "warmup_requests"]
OTHER: list[Any] = ["round-robin", "jsq-tokens", "", [50, 99], [], [math.nan], "99"]


@settings(derandomize=True, database=None, deadline=None, max_examples=60)
@given(reqs=requests(), policy=st.sampled_from(["chunked:512", "layered", "prefill-first",
                                                "chunked", "", 5, None]),
       kwargs=st.dictionaries(st.sampled_from(KWARGS), st.sampled_from(NUMBERS + OTHER),
                              max_size=3))
def test_generated_simulate_calls_return_or_fail_in_one_line(reqs: list[Any], policy: Any,
                                                            kwargs: dict[str, Any]) -> None:
    if kwargs.get("workers") not in (None, 1):  # forking is slow and tested in test_sim.py
        kwargs["workers"] = 1
    try:
        result = simulate(reqs, COST, policy, **kwargs)
    except OURS as e:
        assert len(str(e).splitlines()) == 1, str(e)
        return
    for key, value in result.metrics.items():
        assert not isinstance(value, float) or math.isfinite(value), (key, value)
    assert result.metrics["duration_s"] is not None


@settings(derandomize=True, database=None, deadline=None, max_examples=60)
@given(values=st.dictionaries(
    st.sampled_from(["num_requests", "rate", "duration_s", "replicas", "workers", "seed",
                     "max_concurrency", "warmup_requests", "stagger_s", "speed", "cv", "gpu",
                     "policies", "workload", "metric_percentiles", "block_size", "slo_ttft_ms",
                     "max_context", "arrival", "bogus"]),
    st.sampled_from(NUMBERS + OTHER + ["chunked:512", "fixed:8:2", "gamma", "inf"]), max_size=4))
def test_generated_make_study_calls_return_or_fail_in_one_line(values: dict[str, Any]) -> None:
    try:
        study = make_study(values)
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1 and str(e).startswith("--"), str(e)
        return
    assert study.model_dump()  # a study that validated is whole


def test_the_notebook_api_is_the_package_and_the_names_it_was_documented_under(tmp_path) -> None:
    """`sim.make_study`, `sim.load_study` and `sim.run_study` are the functions the CLI uses, and
    `sim.study`'s old names still reach them; a study file and its keys give the same run."""
    import sim
    import sim.study
    from sim import study_file

    assert sim.make_study is sim.study.make_study is study_file.make_study
    assert sim.load_study is sim.study.load_study is study_file.load_study
    assert sim.run_study is sim.study.run_study is run_study
    path = tmp_path / "study.yaml"
    path.write_text("duration_s: 5\npolicies: [layered]\n")
    by_keys = sim.run_study(sim.make_study({"duration_s": 5, "policies": ["layered"]}))[2][0]
    by_file = sim.run_study(sim.load_study(path))[2][0]
    assert json.dumps(by_keys.metrics, sort_keys=True) == json.dumps(by_file.metrics, sort_keys=True)
    assert by_keys.metrics["completed"] > 0
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        sim.study.nothing  # noqa: B018
