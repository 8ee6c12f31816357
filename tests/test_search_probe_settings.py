"""A search probe simulates its study as `layersim compare` would: every setting the probe's key
includes reaches the simulation (async scheduling did not: it was keyed but ignored)."""

from __future__ import annotations

import pytest

from search.probe import ProbeTask, cost_model_digest, run_probe
from sim.run import run_study
from sim.study_file import make_study


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_probe_runs_its_study_as_compare_does(async_scheduling: bool) -> None:
    study = make_study({"workload": "sharegpt", "rate": 6, "num_requests": 80,
                        "policies": ["chunked:512"], "async_scheduling": async_scheduling})
    workload, cm, (result,) = run_study(study)
    record = run_probe(ProbeTask("k", study, cost_model_digest(cm)), tuple(workload.requests))
    assert record["metrics"]["mean_ttft_ms"] == pytest.approx(result.metrics["mean_ttft_ms"])
    assert record["metrics"]["p99_itl_ms"] == pytest.approx(result.metrics["p99_itl_ms"])
