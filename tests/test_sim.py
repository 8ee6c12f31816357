"""The simulator against a closed form (M/D/1), invariants, determinism and fast-forward."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from costmodel import CostModel, Parallelism, load_model
from policies import PrefillFirst
from sim import simulate
from sim.run import run_study
from sim.study_file import make_study
from tests.helpers import ConstantCost
from traces import WorkloadSpec, build_workload
from traces.request import Request


@pytest.fixture(scope="module")
def qwen_tp2():
    return CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))


def test_md1_mean_wait():
    """One request per batch, one iteration per request, constant service D: an M/D/1 queue.

    Pollaczek-Khinchine for deterministic service: Wq = rho * D / (2 (1 - rho)).
    """
    D, rho, n = 0.01, 0.7, 40_000
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(D / rho, n))
    reqs = [Request(i, float(t), 64, 1) for i, t in enumerate(arrivals)]
    res = simulate(reqs, ConstantCost(D), lambda: PrefillFirst(max_num_seqs=1), check=True)
    wait = (res.requests["ttft_ms"].to_numpy() / 1e3) - D
    expect = rho * D / (2 * (1 - rho))
    # batch-means standard error (waits are correlated)
    batches = wait[: n // 50 * 50].reshape(50, -1).mean(axis=1)
    se = batches.std(ddof=1) / np.sqrt(len(batches))
    assert abs(wait.mean() - expect) < 4 * se
    assert abs(wait.mean() - expect) / expect < 0.08


@pytest.mark.parametrize("policy", ["chunked:512", "layered", "prefill-first",
                                    "examples/shortest_prompt_first.py:ShortestPromptFirst"])
def test_invariants_hold_in_every_run(qwen_tp2, policy):
    w = build_workload(WorkloadSpec("arxiv-long", rate=2.0, duration_s=40, seed=1))
    res = simulate(w.requests, qwen_tp2, policy, check=True)
    req = res.requests
    assert len(req) == len(w.requests)
    done = req[req["finished"]]
    assert len(done) == len(req)
    # tokens conserved: every request got exactly the output tokens it asked for
    asked = {r.req_id: r.output_tokens for r in w.requests}
    assert (done["output_tokens"] == done["req_id"].map(asked)).all()
    assert res.iterations["decode_tokens"].sum() == (done["output_tokens"] - 1).sum()
    # time is monotone: first token after arrival, finish after first token, iterations ordered
    assert (done["first_token_s"] >= done["arrival_s"]).all()
    assert (done["finish_s"] >= done["first_token_s"]).all()
    starts = res.iterations["start_s"].to_numpy()
    assert (np.diff(starts) >= 0).all()
    ends = starts + res.iterations["latency_s"].to_numpy()
    assert (starts[1:] >= ends[:-1] - 1e-9).all()  # one replica runs one iteration at a time


def test_preemption_under_memory_pressure():
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    reqs = [Request(i, i * 0.01, 3000, 600) for i in range(40)]
    res = simulate(reqs, cm, "chunked:512", gpu_memory_utilization=0.5, check=True)
    assert res.metrics["preemptions"] > 0
    assert res.requests["finished"].all()
    assert res.requests["preemptions"].sum() == res.metrics["preemptions"]


def test_same_seed_same_bytes(tmp_path):
    study = make_study({"duration_s": 30, "policies": ["chunked:512", "layered"]})
    for out in ("a", "b"):
        _, _, results = run_study(study)
        for r in results:
            r.write(tmp_path / out)
    for name in ("chunked_512/requests.parquet", "chunked_512/iterations.parquet",
                 "layered/requests.parquet", "layered/metrics.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = make_study({"duration_s": 30, "policies": ["layered"], "seed": 1})
    _, _, (r,) = run_study(other)
    r.write(tmp_path / "c")
    assert (tmp_path / "c/layered/requests.parquet").read_bytes() != \
        (tmp_path / "a/layered/requests.parquet").read_bytes()


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "gpt-oss-20b"])  # gpt-oss: sliding windows
def test_fast_forward_matches_step_by_step(model):
    cm = CostModel(load_model(model), "h100", parallel=Parallelism(tp=2))
    w = build_workload(WorkloadSpec("arxiv-long", rate=1.5, duration_s=40, seed=2))
    fast = simulate(w.requests, cm, "chunked:512", fast_forward=True)
    slow = simulate(w.requests, cm, "chunked:512", fast_forward=False)
    for key in ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "mean_e2el_ms",
                "energy_j", "expert_bytes_per_request", "hbm_bytes_per_request"):
        assert fast.metrics[key] == pytest.approx(slow.metrics[key], rel=1e-6), key
    assert fast.metrics["iterations"] == slow.metrics["iterations"]
    assert len(fast.iterations) < len(slow.iterations) / 3  # it did fast-forward


def test_round_robin_spreads_over_replicas(qwen_tp2):
    w = build_workload(WorkloadSpec("arxiv-long", rate=4.0, duration_s=20, seed=3))
    res = simulate(w.requests, qwen_tp2, "layered", num_replicas=4, check=True)
    counts = res.requests["replica"].value_counts()
    assert sorted(counts.index) == [0, 1, 2, 3]
    assert counts.max() - counts.min() <= 1
    one = simulate(w.requests, qwen_tp2, "layered", num_replicas=1)
    assert res.metrics["mean_ttft_ms"] < one.metrics["mean_ttft_ms"]
    assert res.metrics["gpus"] == 8


def test_layered_reads_fewer_expert_bytes_than_chunked(qwen_tp2):
    w = build_workload(WorkloadSpec("arxiv-long", rate=1.0, duration_s=60, seed=4))
    chunked = simulate(w.requests, qwen_tp2, "chunked:512").metrics
    layered = simulate(w.requests, qwen_tp2, "layered").metrics
    assert layered["expert_bytes_per_request"] < 0.8 * chunked["expert_bytes_per_request"]
    assert layered["energy_per_token_j"] < chunked["energy_per_token_j"]


def test_unfittable_request_is_reported_not_hung():
    cm = CostModel(load_model("tiny-moe"), "cpu")
    reqs = [Request(0, 0.0, 100, 5), Request(1, 0.1, 5000, 5)]  # over tiny-moe's 4096 context
    res = simulate(reqs, cm, "chunked:512")
    assert res.metrics["completed"] == 1 and res.metrics["unfinished"] == 1
    assert isinstance(res.requests, pd.DataFrame)


def test_workers_split_replicas_without_changing_results(qwen_tp2):
    w = build_workload(WorkloadSpec("arxiv-long", rate=4.0, duration_s=20, seed=5))
    one = simulate(w.requests, qwen_tp2, "chunked:512", num_replicas=4)
    two = simulate(w.requests, qwen_tp2, "chunked:512", num_replicas=4, workers=2)
    pd.testing.assert_frame_equal(one.requests, two.requests)
    pd.testing.assert_frame_equal(one.iterations, two.iterations)
    for key in ("mean_ttft_ms", "p99_itl_ms", "energy_j", "slo_attainment"):
        assert one.metrics[key] == pytest.approx(two.metrics[key], rel=1e-12)


def test_streaming_bounds_memory_and_keeps_results(qwen_tp2, tmp_path):
    w = build_workload(WorkloadSpec("arxiv-long", rate=3.0, duration_s=20, seed=6))
    full = simulate(w.requests, qwen_tp2, "layered", num_replicas=2)
    streamed = simulate(w.requests, qwen_tp2, "layered", num_replicas=2, stream_dir=tmp_path)
    pd.testing.assert_frame_equal(full.requests, streamed.requests)
    assert list(tmp_path.glob("requests-part*.parquet"))
    assert streamed.metrics["mean_ttft_ms"] == pytest.approx(full.metrics["mean_ttft_ms"])
    # gap percentiles come from a histogram whose edges are 0.5% apart when streaming
    # (core/records.py); the bin's geometric centre is within 0.5% of anything in its bin
    assert streamed.metrics["p99_itl_ms"] == pytest.approx(full.metrics["p99_itl_ms"], rel=0.005)


def test_metrics_by_hand_on_a_constant_server():
    """One request, prompt 64, 5 output tokens, every iteration D: the prefill emits token 1 at
    D, four decodes emit the rest at 2D..5D (benchmark_serving's definitions)."""
    D = 0.01
    for fast in (True, False):
        res = simulate([Request(0, 0.0, 64, 5)], ConstantCost(D), "chunked:512", fast_forward=fast)
        m = res.metrics
        assert m["mean_ttft_ms"] == pytest.approx(D * 1e3)
        assert m["mean_e2el_ms"] == pytest.approx(5 * D * 1e3)
        assert m["mean_tpot_ms"] == pytest.approx(D * 1e3)  # (E2E - TTFT) / (5 - 1)
        assert m["median_itl_ms"] == pytest.approx(D * 1e3) and m["p99_itl_ms"] == pytest.approx(D * 1e3)
        assert m["request_throughput"] == pytest.approx(1 / (5 * D))
        assert m["output_throughput"] == pytest.approx(5 / (5 * D))
        assert m["total_token_throughput"] == pytest.approx(69 / (5 * D))
        assert m["iterations"] == 5
        assert m["slo_attainment"] == 1.0
