"""benchmark_serving's metric names: std and percentiles by hand on a constant-latency server."""

from __future__ import annotations

import numpy as np
import pytest

from sim.cluster import simulate
from tests.helpers import ConstantCost
from traces.request import Request

D = 0.01  # seconds per iteration, whatever it holds
OUTPUTS = (2, 5, 9, 17)


def isolated_run():  # type: ignore[no-untyped-def]
    """One request at a time (100 s apart): TTFT = D, E2E = output tokens x D, TPOT = D."""
    reqs = [Request(i, 100.0 * i, 64, o) for i, o in enumerate(OUTPUTS)]
    return simulate(reqs, ConstantCost(D), "chunked:512")


def test_std_and_percentiles_match_hand_computed_values() -> None:
    m = isolated_run().metrics
    e2el = np.array(OUTPUTS) * D * 1e3
    assert m["mean_e2el_ms"] == pytest.approx(e2el.mean())
    assert m["std_e2el_ms"] == pytest.approx(np.sqrt(((e2el - e2el.mean()) ** 2).mean()))
    # numpy's linear percentile on [20, 50, 90, 170] ms: p90 at rank 2.7 -> 90 + 0.7 * 80
    assert m["p90_e2el_ms"] == pytest.approx(146.0)
    assert m["p95_e2el_ms"] == pytest.approx(90 + 0.85 * 80)
    assert m["std_ttft_ms"] == pytest.approx(0.0, abs=1e-9)
    assert m["p99_tpot_ms"] == pytest.approx(D * 1e3)
    assert m["request_goodput"] == m["goodput"]


def test_save_result_writes_vllm_json_per_policy(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from cli.main import main

    path = tmp_path / "result.json"
    assert main(["compare", "--duration", "6", "--policies", "chunked:512,layered",
                 "--save-result", str(path)]) == 0
    docs = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("result-*.json")}
    assert sorted(docs) == ["result-chunked_512.json", "result-layered.json"]
    doc = docs["result-layered.json"]
    assert len(doc["ttfts"]) == len(doc["input_lens"]) == doc["num_prompts"]
    assert doc["completed"] == doc["num_prompts"] and doc["backend"] == "layersim"
    assert main(["compare", "--duration", "6", "--save-result", str(tmp_path / "no" / "x.json")]) == 2


def test_a_run_that_pools_no_gaps_records_the_same_requests_and_metrics_but_itl() -> None:
    """pool_gaps=False (replay-silicon's runs): every request row and every metric but the
    pooled ITL ones is the same; those are None (not measured), and no gaps are kept."""
    reqs = [Request(i, 0.004 * i, 64 + 7 * i, 3 + i % 9) for i in range(40)]
    kept = simulate(reqs, ConstantCost(D), "chunked:512", max_concurrency=6, warmup_requests=4)
    lean = simulate(reqs, ConstantCost(D), "chunked:512", max_concurrency=6, warmup_requests=4,
                    pool_gaps=False)
    assert lean.requests.equals(kept.requests)
    pooled = {k for k in kept.metrics if k.endswith("_itl_ms") and not k.startswith("slo_")}
    assert pooled >= {"mean_itl_ms", "median_itl_ms", "std_itl_ms", "p99_itl_ms"}
    assert kept.metrics["mean_itl_ms"] == pytest.approx(D * 1e3)
    for key, value in kept.metrics.items():
        assert lean.metrics[key] == (None if key in pooled else value), key
    assert kept.itls is not None and lean.itls is None
