"""Closed-loop clients (`--max-concurrency`, as `vllm bench serve` runs them) against closed forms.

The server is ConstantCost: every iteration takes D whatever it holds. A request of a 16-token
prompt and k output tokens then takes exactly k iterations (the prompt's iteration gives the
first token), alone or beside others, so N clients that start together stay in lockstep: each
wave of N requests takes k * D, throughput is N / (k D) and every E2E latency is k D. D is a
power of two so that every time is exact in binary.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cli.main import main
from costmodel import ConfigError
from sim.cluster import simulate
from sim.run import run_study
from sim.study import Study
from tests.helpers import ConstantCost
from traces.request import Request

D = 1 / 16  # seconds per iteration
K = 4  # output tokens = iterations per request


def _requests(n: int, gap_s: float = 0.0, prompt: int = 16) -> list[Request]:
    return [Request(i, i * gap_s, prompt, K) for i in range(n)]


def _in_flight_max(req: pd.DataFrame) -> int:
    """Most requests between sent and finished at once (a finish frees its slot first)."""
    when = np.concatenate([req["arrival_s"], req["finish_s"]])
    delta = np.concatenate([np.ones(len(req), int), -np.ones(len(req), int)])
    order = np.lexsort((delta, when))
    return int(np.cumsum(delta[order]).max())


@pytest.mark.parametrize("policy", ["prefill-first", "chunked:512"])
@pytest.mark.parametrize("clients", [1, 4, 16])
def test_n_clients_throughput_is_n_over_service_time(policy: str, clients: int) -> None:
    n = 10 * clients
    res = simulate(_requests(n), ConstantCost(D), policy, max_concurrency=clients,
                   warmup_requests=clients, check=True)
    m, req = res.metrics, res.requests
    assert m["request_throughput"] == pytest.approx(clients / (K * D), rel=1e-12)
    assert m["mean_e2el_ms"] == pytest.approx(K * D * 1e3, rel=1e-12)
    assert m["std_e2el_ms"] == pytest.approx(0.0, abs=1e-9)
    # generated together at 0, but TTFT counts from the send (vLLM's start_time)
    assert m["mean_ttft_ms"] == pytest.approx(D * 1e3, rel=1e-12)
    # duration from the first measured send (end of the warm-up wave) to the last finish
    assert m["duration_s"] == pytest.approx((n // clients - 1) * K * D, rel=1e-12)
    assert m["completed"] == m["num_requests"] == n - clients
    assert m["iterations"] == (n // clients - 1) * K  # the warm-up wave's iterations left out
    assert _in_flight_max(req) == clients
    # each wave is sent when the one before it finishes
    sent = np.sort(req["arrival_s"].unique())
    np.testing.assert_allclose(sent, np.arange(n // clients) * K * D)


def test_warmup_rows_are_marked_and_in_no_metric() -> None:
    clients, warm, n = 4, 6, 40
    res = simulate(_requests(n), ConstantCost(D), "chunked:512", max_concurrency=clients,
                   warmup_requests=warm)
    req, m = res.requests, res.metrics
    assert len(req) == n and req["finished"].all()
    assert req["warmup"].sum() == warm
    assert sorted(req.loc[req["warmup"], "req_id"]) == list(range(warm))  # the first sent
    assert m["warmup_requests"] == warm
    assert m["num_requests"] == m["completed"] == n - warm
    measured = req[~req["warmup"]]
    assert m["total_output_tokens"] == measured["output_tokens"].sum()
    first_measured = measured["arrival_s"].min()
    assert first_measured > 0  # sent when a warm-up request finished
    assert m["duration_s"] == pytest.approx(req["finish_s"].max() - first_measured)
    assert m["request_throughput"] == pytest.approx((n - warm) / m["duration_s"])
    # iterations before the first measured send are not counted
    counted = res.iterations.loc[res.iterations["start_s"] >= first_measured, "iterations"].sum()
    assert m["iterations"] == counted < res.iterations["iterations"].sum()
    # without warm-up every request counts and the window opens at 0
    all_in = simulate(_requests(n), ConstantCost(D), "chunked:512", max_concurrency=clients)
    assert all_in.metrics["num_requests"] == n and not all_in.requests["warmup"].any()
    assert all_in.metrics["iterations"] == all_in.iterations["iterations"].sum()


def test_open_loop_warmup_leaves_out_its_gaps_and_window() -> None:
    """Prefill-first: request 1's prompt stalls request 0's decode for one iteration (a 2 D gap).
    With request 0 as warm-up, the pooled ITL holds request 1's gaps only, all D."""
    reqs = [Request(0, 0.0, 16, 20), Request(1, 1.5 * D, 16, 10)]
    both = simulate(reqs, ConstantCost(D), "prefill-first")
    assert both.metrics["mean_itl_ms"] > D * 1e3  # the 2 D gap, pooled
    res = simulate(reqs, ConstantCost(D), "prefill-first", warmup_requests=1)
    m = res.metrics
    assert m["mean_itl_ms"] == pytest.approx(D * 1e3, rel=1e-12)
    assert m["num_requests"] == 1 and m["warmup_requests"] == 1
    assert m["duration_s"] == pytest.approx(both.requests["finish_s"].max() - 1.5 * D)
    assert m["iterations"] == res.iterations.loc[res.iterations["start_s"] >= 1.5 * D,
                                                 "iterations"].sum()


def test_rate_below_capacity_sets_the_throughput() -> None:
    """Rate 2 req/s against a capacity of N / (k D) = 16 req/s: requests go out as generated and
    each is served alone in k D; throughput = m / ((m - 1) / rate + k D) -> rate."""
    clients, rate, n, warm = 4, 2.0, 200, 4
    res = simulate(_requests(n, 1 / rate), ConstantCost(D), "chunked:512",
                   max_concurrency=clients, warmup_requests=warm)
    m = res.metrics
    measured = n - warm
    assert m["request_throughput"] == pytest.approx(measured / ((measured - 1) / rate + K * D),
                                                    rel=1e-12)
    assert m["request_throughput"] == pytest.approx(rate, rel=0.01)
    assert m["mean_e2el_ms"] == pytest.approx(K * D * 1e3, rel=1e-12)
    sent = res.requests.sort_values("req_id")["arrival_s"].to_numpy()
    np.testing.assert_array_equal(sent, np.arange(n) / rate)  # never held back


def test_rate_above_capacity_is_held_to_n_in_flight() -> None:
    """Rate 64 req/s against 4 clients: the semaphore holds requests back, each waits for a
    slot and is sent when one frees. A request sent the moment another finishes joins the next
    iteration (the replica starts one at that instant without it), so E2E = (k + 1) D and
    throughput = N / ((k + 1) D) in steady state."""
    clients, rate, n = 4, 64.0, 400
    res = simulate(_requests(n, 1 / rate), ConstantCost(D), "chunked:512",
                   max_concurrency=clients, warmup_requests=40)
    req = res.requests.sort_values("req_id")
    assert _in_flight_max(req) == clients
    later = req.iloc[clients:]
    held = later["arrival_s"].to_numpy() > later["req_id"].to_numpy() / rate
    assert held.mean() > 0.9  # almost every request waited for a slot...
    finishes = set(req["finish_s"].round(12))
    assert set(later.loc[held, "arrival_s"].round(12)) <= finishes  # ...and went when one freed
    measured = req[~req["warmup"]]
    np.testing.assert_allclose(measured["e2el_ms"], (K + 1) * D * 1e3)
    steady = clients / ((K + 1) * D)
    assert res.metrics["request_throughput"] == pytest.approx(steady, rel=0.02)


def test_a_rejected_request_takes_its_turn_and_fails_at_once() -> None:
    # tiny-moe's context is 4096: the middle request cannot run
    reqs = [Request(0, 0.0, 16, K), Request(1, 0.0, 5000, K), Request(2, 0.0, 16, K)]
    res = simulate(reqs, ConstantCost(D), "chunked:512", max_concurrency=1)
    req = res.requests.set_index("req_id")
    assert not req.loc[1, "finished"]
    assert req.loc[1, "arrival_s"] == req.loc[2, "arrival_s"] == req.loc[0, "finish_s"] == K * D
    assert res.metrics["rejected_prompt_over_context"] == 1
    assert res.metrics["completed"] == 2


def test_study_closed_loop_defaults_and_header() -> None:
    study = Study(model="tiny-moe", gpu="cpu", tp=1, workload="fixed:64:8", max_concurrency=8,
                  num_requests=200, policies=["chunked:512"])
    assert study.warmup(200) == 8 and study.warmup(50) == 5  # min(N, 10% of the requests)
    assert Study(max_concurrency=8, warmup_requests=0).warmup(200) == 0
    assert Study().warmup(200) == 0  # open loop: none
    workload, _, (res,) = run_study(study)
    assert "closed loop: 8 clients" in workload.description
    assert "req/s" not in workload.description  # no rate: nothing is drawn at one
    assert all(r.arrival_s == 0.0 for r in workload.requests)
    assert res.metrics["warmup_requests"] == 8 and res.requests["warmup"].sum() == 8
    assert res.metrics["num_requests"] == 192
    capped = study.model_copy(update={"rate": 5.0, "num_requests": 50})
    desc = capped.build_workload(4096).description
    assert "closed loop: 8 clients, rate Poisson 5 req/s" in desc
    # no rate and no cap: vLLM's 1000 prompts
    assert len(study.model_copy(update={"num_requests": None}).build_workload(4096).requests) == 1000


def test_a_trace_with_timestamps_gives_its_lengths_in_order() -> None:
    replay = Study(workload="azure-conv", num_requests=30)
    closed = replay.model_copy(update={"max_concurrency": 4})
    assert replay.replays_trace() and not closed.replays_trace()
    own = replay.build_workload(1 << 20)
    loop = closed.build_workload(1 << 20)
    assert [(r.prompt_tokens, r.output_tokens) for r in loop.requests] == \
        [(r.prompt_tokens, r.output_tokens) for r in own.requests]
    assert all(r.arrival_s == 0.0 for r in loop.requests)
    assert "closed loop: 4 clients (own arrivals not replayed)" in loop.description


def test_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="--workers 2 cannot split closed-loop clients"):
        simulate(_requests(8), ConstantCost(D), "chunked:512", num_replicas=2, workers=2,
                 max_concurrency=2)
    with pytest.raises(ConfigError, match="--warmup-requests 8"):
        simulate(_requests(8), ConstantCost(D), "chunked:512", max_concurrency=2,
                 warmup_requests=8)
    with pytest.raises(ConfigError, match="--duration needs --rate"):
        Study(max_concurrency=2, duration_s=10.0).build_workload(4096)


def test_flags_reach_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--model", "tiny-moe", "--gpu", "cpu", "--tp", "1",
                 "--policies", "chunked:512", "--workload", "fixed:64:8", "--num-requests", "40",
                 "--max-concurrency", "4", "--warmup-requests", "3", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    metrics = [line for line in out.splitlines() if line.startswith("{")]
    assert '"warmup_requests": 3' in metrics[0] and '"num_requests": 37' in metrics[0]


def test_stagger_spreads_the_first_requests_and_keeps_clients_apart() -> None:
    from sim.run import run_study
    from sim.study_file import make_study

    study = make_study({"model": "tiny-moe", "gpu": "cpu", "tp": 1, "policies": ["chunked:512"],
                        "workload": "fixed:64:8", "max_concurrency": 4, "num_requests": 12,
                        "warmup_requests": 0, "stagger_s": 2.0})
    workload, _, (result,) = run_study(study)
    assert [r.arrival_s for r in workload.requests[:5]] == [0.0, 0.5, 1.0, 1.5, 1.5]
    sent = sorted(result.requests["arrival_s"])
    assert sent[:4] == [0.0, 0.5, 1.0, 1.5]  # client i's first request at i x 2 s / 4
    with pytest.raises(ConfigError, match="stagger_s"):
        make_study({"stagger_s": 1.0})  # open loop: nothing to stagger
