"""Prefill/decode disaggregation (sim/disagg.py, core/handoff.py): closed forms on constant
iterations and a known link, and conservation of every request's KV. The links and layer-wise
transfer: tests/test_disagg_links.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

import sim.disagg
from core.state import PlanError
from costmodel import CostModel, Parallelism, load_model
from costmodel.errors import ConfigError
from costmodel.transfer import KVLink, kv_link, transfer_s
from sim.disagg import Pool, simulate_disagg
from tests.helpers import ConstantCost
from traces import Request

C = 0.01  # every iteration takes 10 ms
P = 64  # prompt tokens


def _link(cm: CostModel, wire_s: float, latency_s: float = 0.001) -> KVLink:
    """A link on which P tokens' KV takes `wire_s` in all."""
    return KVLink(P * cm.kv_bytes_per_token_per_gpu / (wire_s - latency_s), latency_s, "test")


def _rows(res):  # type: ignore[no-untyped-def]
    return res.requests.set_index("req_id")


def _second_token_gap(res, req_id: int) -> float:  # type: ignore[no-untyped-def]
    return float(res.itls.per_request([req_id])[0][0])


def test_one_request_ttft_and_second_token_gap_by_hand() -> None:
    """Prompt at the prefill worker: first token at C (TTFT). The KV then takes X on the wire;
    the idle decode worker starts at C + X and emits the second token a C later, so the gap
    before it is C + X, and the other three follow every C."""
    cm = ConstantCost(C)
    x = 0.004
    res = simulate_disagg([Request(0, 0.0, P, 5)], Pool(cm, "chunked:512"),
                          Pool(cm, "chunked:512"), _link(cm, x))
    row = _rows(res).loc[0]
    assert row["ttft_ms"] == pytest.approx(C * 1e3)
    assert _second_token_gap(res, 0) == pytest.approx(C + x)
    assert row["e2el_ms"] == pytest.approx((5 * C + x) * 1e3)
    assert row["tpot_ms"] == pytest.approx((4 * C + x) / 4 * 1e3)
    assert res.metrics["mean_kv_transfer_ms"] == pytest.approx(x * 1e3)
    assert res.metrics["mean_kv_wait_ms"] == pytest.approx(0.0)
    assert res.metrics["gpus"] == 2 * cm.parallel.num_gpus


def test_async_scheduling_sees_kv_that_arrives_mid_iteration_one_planning_point_later() -> None:
    """As above, with async scheduling: the second KV arrives at C + 2X while the decode worker
    runs [C + X, 2C + X], whose successor [2C + X, 3C + X] was planned already; it joins the one
    after, its second token at 4C + X (gap 3C + X). The first KV found the worker idle and
    starts at once, as without async scheduling."""
    cm = ConstantCost(C)
    x = 0.004
    res = simulate_disagg([Request(0, 0.0, P, 3), Request(1, 0.0, P, 3)],
                          Pool(cm, "chunked:512"), Pool(cm, "chunked:512"), _link(cm, x),
                          async_scheduling=True, check=True)
    assert _second_token_gap(res, 0) == pytest.approx(C + x)
    assert _second_token_gap(res, 1) == pytest.approx(3 * C + x)
    assert _rows(res).loc[1, "e2el_ms"] == pytest.approx((5 * C + x) * 1e3)


def test_a_one_token_request_ends_at_the_prefill_worker() -> None:
    cm = ConstantCost(C)
    res = simulate_disagg([Request(0, 0.0, P, 1)], Pool(cm, "chunked:512"),
                          Pool(cm, "chunked:512"), _link(cm, 0.004))
    assert res.metrics["completed"] == 1 and res.metrics["kv_transfers"] == 0
    assert _rows(res).loc[0, "e2el_ms"] == pytest.approx(C * 1e3)


def _pressure() -> list[Request]:
    """Eighty long requests in two bursts on small real pools: the decode workers run out of
    blocks (transfers wait for them, decodes are preempted)."""
    rng = np.random.default_rng(7)
    return [Request(i, 0.05 * (i // 40), int(rng.integers(500, 3000)), int(rng.integers(2, 600)))
            for i in range(80)]


@pytest.mark.parametrize(("max_concurrency", "async_scheduling"),
                         [(None, False), (8, False), (None, True)])
def test_every_kv_moves_once_and_no_decode_starts_before_it_arrives(
        max_concurrency, async_scheduling) -> None:
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    requests = _pressure()
    res = simulate_disagg(requests, Pool(cm, "chunked:512", 2), Pool(cm, "chunked:256", 2),
                          gpu_memory_utilization=0.45, check=True,
                          max_concurrency=max_concurrency, async_scheduling=async_scheduling)
    rows = _rows(res)
    assert res.metrics["completed"] == len(requests)
    assert res.metrics["kv_transfers"] == sum(r.output_tokens > 1 for r in requests)
    moved = rows[rows["output_tokens"] > 1]
    assert np.isfinite(moved[["kv_ready_s", "kv_start_s", "kv_end_s"]].to_numpy()).all()
    assert (moved["kv_ready_s"] == moved["first_token_s"]).all()  # it moves once the token is out
    assert (moved["kv_start_s"] >= moved["kv_ready_s"]).all()
    second = moved["first_token_s"] + [_second_token_gap(res, rid) for rid in moved.index]
    assert (second > moved["kv_end_s"]).all()  # no decode before the KV is there
    if max_concurrency is None:  # the bursts: blocks ran short on the decode side
        assert res.metrics["preemptions"] > 0
        assert res.metrics["p99_kv_wait_ms"] > 100 * res.metrics["p99_kv_transfer_ms"]


def test_memory_left_behind_is_an_error(monkeypatch) -> None:
    """The end-of-run check that every block came back: a prefill worker that never frees what
    it sent is caught."""
    monkeypatch.setattr(sim.disagg, "release_sent", lambda state, req: state.in_transit.remove(req))
    cm = ConstantCost(C)
    with pytest.raises(PlanError, match="worker 0 still holds"):
        simulate_disagg([Request(0, 0.0, P, 5)], Pool(cm, "chunked:512"),
                        Pool(cm, "chunked:512"), _link(cm, 0.004))


def test_the_link_presets_and_the_transfer_time() -> None:
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    net = kv_link("h100")
    assert (net.bytes_per_s, net.latency_s) == (50e9, 10e-6)
    assert kv_link("h100", same_node=True).bytes_per_s == 450e9
    # 1,000 tokens of Qwen3-30B-A3B's KV (48 layers x 4 KV heads x 128 x 2 (K, V) x 2 bytes),
    # halved per GPU by TP 2
    per_gpu = 48 * 4 * 128 * 2 * 2 / 2
    assert cm.kv_bytes_per_token_per_gpu == per_gpu
    assert transfer_s(cm, 1000, net) == pytest.approx(10e-6 + 1000 * per_gpu / 50e9)
    assert transfer_s(cm, 0, net) == 0.0
    with pytest.raises(ConfigError, match="no network figure for cpu"):
        kv_link("cpu")
    with pytest.raises(ConfigError, match="bandwidth"):
        KVLink(0.0, 0.0, "x")
    assert math.isfinite(transfer_s(cm, 1, net))


def test_pools_of_different_models_are_refused() -> None:
    a = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    b = CostModel(load_model("tiny-moe"), "h100")
    with pytest.raises(ConfigError, match="different models"):
        simulate_disagg([Request(0, 0.0, P, 5)], Pool(a, "chunked:512"), Pool(b, "chunked:512"))


# ---- the study keys and flags -------------------------------------------------------------------

def test_a_study_runs_disaggregated_from_its_keys() -> None:
    from sim.run import run_study
    from sim.study_file import make_study

    base = {"workload": "sharegpt", "rate": 4, "num_requests": 60, "policies": ["chunked:512"]}
    _, _, (res,) = run_study(make_study({**base, "prefill_replicas": 1, "decode_replicas": 2,
                                         "decode_policy": "chunked:256", "kv_link_gb_per_s": 25}))
    m = res.metrics
    assert (m["prefill_replicas"], m["decode_replicas"], m["gpus"]) == (1, 2, 6)
    assert (m["prefill_policy"], m["decode_policy"], m["policy"]) == (
        "chunked:512", "chunked:256", "chunked:512+chunked:256")
    assert m["completed"] == 60 and m["kv_transfers"] == 60
    # a prompt of P tokens took 10 us + P x KV bytes per GPU / 25 GB/s on the wire
    rows = res.requests.set_index("req_id")
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    wire = (rows["kv_end_s"] - rows["kv_start_s"]).to_numpy()
    want = 10e-6 + rows["prompt_tokens"].to_numpy() * cm.kv_bytes_per_token_per_gpu / 25e9
    assert wire == pytest.approx(want)


@pytest.mark.parametrize("keys, message", [
    ({"prefill_replicas": 1}, "give both"),
    ({"prefill_replicas": 1, "decode_replicas": 1, "replicas": 2}, "replicas: leave it out"),
])
def test_disaggregated_keys_that_do_not_fit_are_refused(keys, message) -> None:
    from sim.run import run_study
    from sim.study_file import make_study

    study = make_study({"workload": "sharegpt", "rate": 4, "num_requests": 20, **keys})
    with pytest.raises(ConfigError, match=message):
        run_study(study)


@pytest.mark.parametrize("command", [["capacity"], ["search"]])
def test_searches_refuse_disaggregated_keys_rather_than_ignore_them(command, capsys) -> None:
    from cli.main import main

    rc = main([*command, "--prefill-replicas", "1", "--decode-replicas", "1", "--duration", "5"])
    assert rc == 2
    assert "searches the pools' sizes with split_pools" in capsys.readouterr().err


# ---- found by review ----------------------------------------------------------------------------

@pytest.mark.parametrize("router", ["least-outstanding", "jsq-tokens"])
def test_load_ordered_routers_spread_both_pools(router: str) -> None:
    """They keep their workers ordered by load, so each worker's load changes must reach its
    pool's router (they did not: a stale heap, then an IndexError)."""
    cm = ConstantCost(C)
    reqs = [Request(i, 0.001 * i, 64, 50) for i in range(6)]
    res = simulate_disagg(reqs, Pool(cm, "chunked:512", 2, router),
                          Pool(cm, "chunked:512", 2, router), KVLink(1e12, 0.0, "fast"))
    assert res.metrics["completed"] == 6
    assert set(res.requests["replica"]) == {2, 3}  # both decode workers (ids after the prefill's)
    assert set(res.iterations.loc[res.iterations.replica < 2, "replica"]) == {0, 1}


def test_a_prefill_worker_waits_for_its_sent_kv_instead_of_thrashing(monkeypatch) -> None:
    """A prefill worker whose blocks are held by a KV waiting for a decode worker's room: the
    next prompt cannot grow, and preempting it frees nothing that would help. It waits for the
    transfer's end (which wakes it); it used to restart the prompt until the livelock check
    stopped the run."""
    pm, dm = ConstantCost(0.001), ConstantCost(C)
    monkeypatch.setattr(sim.disagg, "kv_blocks",
                        lambda cm, bs, u, *a: (200, 0.0) if cm is pm else (210, 0.0))
    reqs = [Request(0, 0.0, 3000, 300), Request(1, 0.1, 2400, 10), Request(2, 0.2, 1000, 10)]
    res = simulate_disagg(reqs, Pool(pm, "chunked:512"), Pool(dm, "chunked:512"),
                          KVLink(1e15, 0.0, "fast"), enable_prefix_caching=False)
    assert res.metrics["completed"] == 3 and res.metrics["preemptions"] == 0


def test_a_reservation_leaves_the_running_decodes_next_blocks(monkeypatch) -> None:
    """Ten decode blocks of 16 tokens. A (64 + 60) decodes there; B's prompt (80 tokens, 5
    blocks) asks for room at the planning point where A holds 80 tokens in 5 blocks and needs a
    sixth for its next token: taking the 5 free blocks would preempt A, so B waits for A."""
    pm, dm = ConstantCost(C), ConstantCost(C)
    monkeypatch.setattr(sim.disagg, "kv_blocks",
                        lambda cm, bs, u, *a: (1000, 0.0) if cm is pm else (10, 0.0))
    reqs = [Request(0, 0.0, 64, 60), Request(1, 0.155, 80, 5)]
    res = simulate_disagg(reqs, Pool(pm, "chunked:512"), Pool(dm, "chunked:512"),
                          KVLink(1e15, 0.0, "fast"), enable_prefix_caching=False)
    rows = _rows(res)
    assert res.metrics["completed"] == 2 and res.metrics["preemptions"] == 0
    assert rows.loc[1, "kv_start_s"] >= rows.loc[0, "finish_s"]  # reserved once A was done


# ---- capacity over the split (the walk itself: tests/test_split.py) --------------------------

def test_capacity_split_pools_from_the_command_line(capsys) -> None:
    from cli.main import main

    assert main(["capacity", "--split-pools", "--duration", "5"]) == 2
    assert "--split-pools needs --rate" in capsys.readouterr().err
    rc = main(["capacity", "--split-pools", "--rate", "1", "--policies", "layered",
               "--duration", "20", "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and '"prefill_replicas": 1' in out and '"decode_replicas": 1' in out


# ---- found by the second review -------------------------------------------------------------------


def test_warm_up_transfers_are_left_out_of_the_kv_metrics() -> None:
    cm = ConstantCost(C)
    link = KVLink(64 * cm.kv_bytes_per_token_per_gpu / 0.001, 0.0, "test")  # 1 ms per 64 tokens
    res = simulate_disagg([Request(0, 0.0, 640, 3), Request(1, 1.0, 64, 3)],
                          Pool(cm, "chunked:4096"), Pool(cm, "chunked:4096"), link,
                          warmup_requests=1)
    assert res.metrics["completed"] == 1 and res.metrics["kv_transfers"] == 1
    assert res.metrics["mean_kv_transfer_ms"] == pytest.approx(1.0)


def test_a_first_token_at_a_decode_iterations_end_is_seen_alike_with_and_without_fast_forward(
        ) -> None:
    """Request 2 is sent when request 1 finishes and its first token comes out at 7 C, the end
    of a decode iteration: both executors take its KV at that planning point."""
    c = 2.0 ** -7
    cm = ConstantCost(c)
    reqs = [Request(0, 0.0, 64, 12), Request(1, 0.0, 64, 5), Request(2, 0.0, 64, 7)]
    rows = [_rows(simulate_disagg(reqs, Pool(cm, "chunked:512"), Pool(cm, "chunked:512"),
                                  KVLink(1e15, 0.0, "instant"), fast_forward=ff, check=True,
                                  max_concurrency=2)) for ff in (True, False)]
    for col in ("first_token_s", "kv_start_s", "finish_s"):
        assert rows[0][col].tolist() == pytest.approx(rows[1][col].tolist()), col
    assert rows[0].loc[2, "kv_start_s"] == pytest.approx(7 * c)


def test_a_decode_tp_that_does_not_divide_the_model_names_its_flag() -> None:
    from sim.run import run_study
    from sim.study_file import make_study

    study = make_study({"workload": "sharegpt", "rate": 4, "num_requests": 10,
                        "prefill_replicas": 1, "decode_replicas": 1, "decode_tp": 3})
    with pytest.raises(ConfigError, match="--decode-tp 3"):
        run_study(study)


# ---- found by the third review --------------------------------------------------------------------


def test_every_slo_and_percentile_key_reaches_a_disaggregated_run() -> None:
    """slo_tpot_ms, slo_e2el_ms and metric_percentiles were left out of the pools' runs: a
    TPOT target no request can meet must cost attainment there as co-located."""
    from sim.run import run_study
    from sim.study_file import make_study

    keys = {"workload": "sharegpt", "rate": 4, "num_requests": 40, "policies": ["chunked:512"],
            "prefill_replicas": 1, "decode_replicas": 1, "slo_tpot_ms": 0.001,
            "slo_e2el_ms": 1e9, "metric_percentiles": [50, 75]}
    _, _, (res,) = run_study(make_study(keys))
    m = res.metrics
    assert m["slo_attainment"] < 0.1 and m["slo_tpot_ms"] == 0.001 and m["slo_e2el_ms"] == 1e9
    assert "p75_ttft_ms" in m


def test_async_scheduling_fast_forwards_as_it_steps() -> None:
    """With async scheduling a deferred KV or arrival ends a fast-forwarded run at the next
    planning point: every request's times are those of step-by-step simulation."""
    rng = np.random.default_rng(3)
    requests = [Request(i, float(rng.uniform(0, 0.05)), int(rng.integers(10, 2000)),
                        int(rng.integers(1, 60))) for i in range(30)]
    pm, dm = ConstantCost(0.002), ConstantCost(0.01)
    runs = [simulate_disagg(requests, Pool(pm, "layered", 2), Pool(dm, "chunked:256", 2),
                            KVLink(1e9, 0.001, "test"), async_scheduling=True, check=True,
                            stream_kv=stream, fast_forward=ff)
            for stream in (False, True) for ff in (True, False)]
    for fast, step in (runs[:2], runs[2:]):
        cols = ["req_id", "ttft_ms", "e2el_ms", "kv_end_s"]
        assert fast.metrics["completed"] == len(requests)
        assert np.allclose(fast.requests.sort_values("req_id")[cols].to_numpy(),
                           step.requests.sort_values("req_id")[cols].to_numpy(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_hand_off_at_a_step_end_is_seen_alike_fast_forwarded_and_stepped(async_scheduling) -> None:
    """Closed loop on constant 10 ms iterations: a first token handed on exactly at the end of
    a decode step. Fast-forwarded step ends were an arithmetic series, an ulp below the sum
    stepping makes, so the run took one step too many and the KV landed an iteration later."""
    requests = [Request(0, 0.0, 388, 4), Request(1, 0.0, 599, 7), Request(2, 0.0, 597, 7)]
    runs = [simulate_disagg(requests, Pool(ConstantCost(C), "chunked:512"),
                            Pool(ConstantCost(C), "chunked:512"), KVLink(1e10, 0.001, "test"),
                            fast_forward=ff, check=True, max_concurrency=2,
                            async_scheduling=async_scheduling)
            for ff in (True, False)]
    fast, step = (_rows(r).loc[2] for r in runs)
    assert fast["kv_end_s"] == step["kv_end_s"] and fast["e2el_ms"] == step["e2el_ms"]


def test_a_second_token_gap_over_the_itl_target_misses_the_slo() -> None:
    """300 output tokens: the P99 of a request's 299 gaps is a 10 ms decode step whatever the
    gap before the second token, which holds the KV's move (C + X). Over the ITL target it
    misses: a decode pool that cannot keep up, or a slow link, shows in the attainment."""
    cm = ConstantCost(C)
    for x, attained in ((0.004, 1.0), (0.2, 0.0)):
        res = simulate_disagg([Request(0, 0.0, P, 300)], Pool(cm, "chunked:512"),
                              Pool(cm, "chunked:512"), _link(cm, x), slo_itl_ms=100)
        row = _rows(res).loc[0]
        assert row["p99_itl_ms"] == pytest.approx(C * 1e3)
        assert row["second_token_gap_ms"] == pytest.approx((C + x) * 1e3)
        assert res.metrics["slo_attainment"] == attained


class _ByIdPolicy:
    """A user's policy that looks its running requests up by id (ReplicaState.running_by_id,
    read-only) before planning as chunked:512 does."""

    stall_free = True
    name = "by-id"

    def __init__(self) -> None:
        from policies.chunked import ChunkedPrefill
        self._inner = ChunkedPrefill(512)

    def schedule(self, state):  # type: ignore[no-untyped-def]
        by_id = state.running_by_id
        assert len(by_id) == len(state.running) and all(by_id[r.req_id] is r for r in state.running)
        return self._inner.schedule(state)


def test_a_users_policy_may_read_running_by_id_on_a_decode_worker() -> None:
    """A decode worker's arrived requests join `running` (core/handoff.py) without the id map:
    a user's policy that read `running_by_id` then rebuilt it, and was taken for one that
    changed the state (a PlanError naming _by_id). Found by review."""
    cm = ConstantCost(C)
    res = simulate_disagg([Request(i, 0.002 * i, P, 5) for i in range(4)],
                          Pool(cm, "chunked:512"), Pool(cm, _ByIdPolicy), _link(cm, 0.004))
    assert res.metrics["completed"] == 4
