"""Prefill/decode disaggregation's links (sim/workers.py's Links, costmodel/transfer.py): transfers
take turns on each worker's links, in closed form on constant iterations, and layer-wise transfer
(stream_kv) hides all but the last group, without deadlock or thrashing under KV pressure."""

from __future__ import annotations

import pytest

import sim.disagg
from costmodel import CostModel, Parallelism, load_model
from costmodel.transfer import KVLink, kv_link, transfer_s
from sim.disagg import Pool, simulate_disagg
from tests.helpers import ConstantCost
from tests.test_disagg import C, P, _link, _pressure, _rows, _second_token_gap
from traces import Request


def test_transfers_from_one_worker_take_turns_on_its_link() -> None:
    """Two prompts prefilled together: both first tokens at C. The link carries one KV then the
    other: the second waits X and arrives at C + 2X, while the decode worker runs the first's
    iteration [C + X, 2C + X]; it joins the next one, its second token at 3C + X."""
    cm = ConstantCost(C)
    x = 0.004
    res = simulate_disagg([Request(0, 0.0, P, 3), Request(1, 0.0, P, 3)],
                          Pool(cm, "chunked:512"), Pool(cm, "chunked:512"), _link(cm, x))
    rows = _rows(res)
    assert rows["ttft_ms"].tolist() == pytest.approx([C * 1e3, C * 1e3])
    assert rows.loc[1, "kv_start_s"] == pytest.approx(C + x)
    assert rows.loc[1, "kv_end_s"] == pytest.approx(C + 2 * x)
    assert _second_token_gap(res, 0) == pytest.approx(C + x)
    assert _second_token_gap(res, 1) == pytest.approx(2 * C + x)
    assert res.metrics["mean_kv_wait_ms"] == pytest.approx(x / 2 * 1e3)


LONG = 2048  # layered:4 runs this prompt in 4 groups of one layer each (tiny-moe has 4 layers)


def _long_link(cm: CostModel, piece_s: float, latency_s: float = 0.001) -> KVLink:
    """A link on which one layer of LONG tokens' KV takes `piece_s` in all."""
    bytes_one_layer = LONG * cm.kv_bytes_per_token_per_gpu / cm.model.num_layers
    return KVLink(bytes_one_layer / (piece_s - latency_s), latency_s, "test")


@pytest.mark.parametrize("stream", [False, True])
def test_layer_wise_transfer_hides_all_but_the_last_group(stream: bool) -> None:
    """Layered prefill in 4 groups: the first token at 4C. Whole-prompt transfer then sends 4
    layers (latency + 4 x 1 ms: 5 ms); layer-wise, each group's layer left at the end of its
    iteration (2 ms each, done before the next group ends), so only the last is exposed: the
    second-token gap is C + 5 ms against C + 2 ms."""
    cm = ConstantCost(C)
    y = 0.002
    res = simulate_disagg([Request(0, 0.0, LONG, 3)], Pool(cm, "layered:4"),
                          Pool(cm, "chunked:512"), _long_link(cm, y), stream_kv=stream)
    row = _rows(res).loc[0]
    assert row["ttft_ms"] == pytest.approx(4 * C * 1e3)
    exposed = y if stream else 0.001 + 4 * (y - 0.001)
    assert _second_token_gap(res, 0) == pytest.approx(C + exposed)
    assert res.metrics["mean_kv_exposed_ms"] == pytest.approx(exposed * 1e3)
    assert row["kv_start_s"] == pytest.approx(C if stream else 4 * C)  # the first group's end
    assert res.metrics["kv_transfers"] == 1


def test_streamed_pieces_queue_on_a_slow_link() -> None:
    """Pieces of 3C each on the wire, made every C: they back up, the last leaves at
    C + 3 x 3C = 10C and lands at 13C, 9C after the first token."""
    cm = ConstantCost(C)
    res = simulate_disagg([Request(0, 0.0, LONG, 3)], Pool(cm, "layered:4"),
                          Pool(cm, "chunked:512"), _long_link(cm, 3 * C), stream_kv=True)
    assert _rows(res).loc[0, "kv_end_s"] == pytest.approx(13 * C)
    assert _second_token_gap(res, 0) == pytest.approx(9 * C + C)


def test_streamed_runs_conserve_kv_under_pressure() -> None:
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    requests = _pressure()
    for stream in (False, True):
        res = simulate_disagg(requests, Pool(cm, "layered", 2), Pool(cm, "chunked:256", 2),
                              gpu_memory_utilization=0.45, check=True, stream_kv=stream)
        rows = _rows(res)
        moved = rows[rows["output_tokens"] > 1]
        assert res.metrics["completed"] == len(requests)
        assert res.metrics["kv_transfers"] == len(moved)
        second = moved["first_token_s"] + [_second_token_gap(res, rid) for rid in moved.index]
        assert (second > moved["kv_end_s"]).all()
        assert (moved["kv_end_s"] >= moved["kv_ready_s"]).all()


def test_streams_do_not_deadlock_on_each_others_blocks(monkeypatch) -> None:
    """A streaming prompt reserves decode blocks at its first piece. Here one that is part-way
    held them while an older, finished prompt waited for them, and the finished one's KV held
    the prefill blocks the part-way one needed: neither moved. A prefill worker that streams
    now preempts such a prompt (its stream and reservation given back) rather than wait; and
    a reservation is asked for at once, so a cancel at the same instant finds it."""
    pm, dm = ConstantCost(0.002), ConstantCost(C)
    monkeypatch.setattr(sim.disagg, "kv_blocks",
                        lambda cm, bs, u, *a: (125, 0.0) if cm is pm else (118, 0.0))
    reqs = [Request(1, 0.001, 300, 2), Request(3, 0.008, 1400, 2), Request(2, 0.014, 900, 2),
            Request(4, 0.014, 1500, 2), Request(0, 0.019, 500, 2)]
    res = simulate_disagg(reqs, Pool(pm, "chunked:1024"), Pool(dm, "chunked:1024"),
                          KVLink(1e9, 0.0, "t"), stream_kv=True, enable_prefix_caching=False,
                          check=True)
    assert res.metrics["completed"] == 5 and res.metrics["preemptions"] > 0


def test_a_stream_sends_the_cached_prefix_too() -> None:
    """Request 1 hits 3 of its 4 blocks of 512 tokens in the prefill worker's cache: only its
    last 512 tokens are computed there, but the decode worker needs all 2,048 tokens' KV."""
    cm = ConstantCost(C)
    long = 2048
    link = KVLink(long * cm.kv_bytes_per_token_per_gpu / 0.001, 0.0, "test")  # 1 ms the prompt
    reqs = [Request(0, 0.0, long, 3, (1, 2, 3, 4)), Request(1, 1.0, long, 3, (1, 2, 3, 5))]
    for stream in (False, True):
        res = simulate_disagg(reqs, Pool(cm, "chunked:4096"), Pool(cm, "chunked:4096"), link,
                              stream_kv=stream, check=True)
        rows = _rows(res)
        assert res.metrics["prefix_cache_hits"] == 1536  # request 1's three shared blocks
        wire = (rows["kv_end_s"] - rows["kv_start_s"]).tolist()
        assert wire == pytest.approx([0.001, 0.001])


def test_transfers_into_one_decode_worker_take_turns_on_its_links() -> None:
    """Two prefill workers each finish a prompt at C; their KV goes to the one decode worker,
    whose links take one transfer at a time: the second lands at C + 2X, not C + X."""
    cm = ConstantCost(C)
    x = 0.004
    res = simulate_disagg([Request(0, 0.0, P, 3), Request(1, 0.0, P, 3)],
                          Pool(cm, "chunked:512", 2), Pool(cm, "chunked:512"), _link(cm, x))
    ends = sorted(_rows(res)["kv_end_s"])
    assert ends == pytest.approx([C + x, C + 2 * x])


def test_a_decode_worker_with_fewer_gpus_takes_longer_to_receive() -> None:
    """Prefill TP 4, decode TP 2: each decode GPU takes twice the bytes each prefill GPU sends,
    so the receiving side bounds the transfer."""
    model = load_model("qwen3-30b-a3b")
    p4 = CostModel(model, "h100", parallel=Parallelism(tp=4))
    d2 = CostModel(model, "h100", parallel=Parallelism(tp=2))
    link = kv_link("h100")
    assert transfer_s(p4, 1000, link, receiver=d2) == pytest.approx(
        transfer_s(d2, 1000, link)) == pytest.approx(10e-6 + 1000 * 48 * 4 * 128 * 2 * 2 / 2 / 50e9)
    assert transfer_s(p4, 1000, link, receiver=d2) > transfer_s(p4, 1000, link)


def test_a_slow_link_does_not_make_a_streaming_prefill_worker_thrash(monkeypatch) -> None:
    """Two long prompts, 130 prefill blocks, a 1 MB/s link: the first prompt's KV takes long to
    leave and its blocks with it. Its decode blocks are already reserved, so the worker waits
    for it (it used to restart the second prompt until the livelock check stopped the run)."""
    pm, dm = ConstantCost(0.002), ConstantCost(C)
    monkeypatch.setattr(sim.disagg, "kv_blocks",
                        lambda cm, bs, u, *a: (130, 0.0) if cm is pm else (1000, 0.0))
    reqs = [Request(0, 0.0, 1500, 5), Request(1, 0.0, 1500, 5)]
    for ff in (False, True):
        res = simulate_disagg(reqs, Pool(pm, "chunked:256"), Pool(dm, "chunked:256"),
                              KVLink(1e6, 0.0, "slow"), stream_kv=True, check=True,
                              fast_forward=ff)
        assert res.metrics["completed"] == 2 and res.metrics["preemptions"] == 0


def test_a_receiver_with_more_gpus_than_kv_heads_is_sent_every_copy() -> None:
    """Qwen3-30B-A3B has 4 KV heads: a decode worker of TP 8 holds each twice, and a prefill
    worker of TP 1 sends all eight GPUs' shares over its one link."""
    model = load_model("qwen3-30b-a3b")
    p1 = CostModel(model, "h100", parallel=Parallelism(tp=1))
    d8 = CostModel(model, "h100", parallel=Parallelism(tp=8))
    link = KVLink(1e9, 0.0, "t")
    per_token = 8 * d8.kv_bytes_per_token_per_gpu
    assert per_token == 2 * p1.kv_bytes_per_token_per_gpu
    assert transfer_s(p1, 1000, link, receiver=d8) == pytest.approx(1000 * per_token / 1e9)


def _links_run(transfers: list[tuple[str, str, str, float, float]],
               give_up: tuple[str, float] | None = None):  # type: ignore[no-untyped-def]
    """Transfers (name, sender, receiver, asked at, seconds) on sim.workers.Links; `give_up`:
    (name, when) one is interrupted while it waits. Returns when each started, and the links."""
    import simpy

    from sim.workers import Links

    env = simpy.Environment()
    links = Links(env)
    started: dict[str, float] = {}

    def send(name: str, src: str, dst: str, at: float, seconds: float):  # type: ignore[no-untyped-def]
        yield env.timeout(at)
        granted = links.take(src, dst)
        try:
            yield granted
            started[name] = env.now
            yield env.timeout(seconds)
        except simpy.Interrupt:
            return
        finally:
            links.release(src, dst, granted)

    procs = {t[0]: env.process(send(*t)) for t in transfers}
    if give_up is not None:
        def interrupt():  # type: ignore[no-untyped-def]
            yield env.timeout(give_up[1])
            procs[give_up[0]].interrupt()
        env.process(interrupt())
    env.run()
    return started, links


def test_a_transfer_waiting_for_its_receiver_holds_no_link() -> None:
    """B->D1 on the wire over [0, 10]; A->D1 asks at 1 and waits for D1; A->D2 asks at 2 and
    goes at once (the waiting transfer holds none of A's links), over [2, 5]; A->D1 starts at
    10, when D1 frees; A->D2' asks at 11 and waits for A until 13; two pieces asked at once on
    the same links go in order. Holding A's link while waiting, A->D2 would start at 13."""
    started, links = _links_run([
        ("B-D1", "B", "D1", 0, 10), ("A-D1", "A", "D1", 1, 3), ("A-D2", "A", "D2", 2, 3),
        ("A-D2'", "A", "D2", 11, 1), ("C-D3 first", "C", "D3", 0, 2),
        ("C-D3 second", "C", "D3", 0, 2)])
    assert started == {"B-D1": 0, "A-D1": 10, "A-D2": 2, "A-D2'": 13, "C-D3 first": 0,
                       "C-D3 second": 2}
    assert not links.busy and not links.waiting


def test_a_transfer_passed_on_its_links_again_and_again_reserves_them() -> None:
    """A->D1 asks at 0.5 while chains A->D2 and B->D1 keep A and D1 busy in turn (each free half
    the time, never both): passed on its links 8 times it reserves them and starts when the
    transfers on them end (found by review: it started after all 98 later ones); a transfer
    given up while it waits leaves the queue."""
    transfers = [("A-D1", "A", "D1", 0.5, 1), ("C-D2", "C", "D2", 0.5, 1)]
    for i in range(50):
        transfers += [(f"A-D2 {i}", "A", "D2", 2 * i, 2),
                      (f"B-D1 {i}", "B", "D1", 2 * i - 1 if i else 0, 2 if i else 1)]
    started, links = _links_run(transfers, give_up=("C-D2", 0.75))
    # passed by B-D1 1 at 1, A-D2 1 at 2, ..., A-D2 4 at 8 (the 8th): A and D1 reserved, B-D1 5
    # (asks at 9, D1 free) waits, and A-D1 goes when A-D2 4 gives A back at 10
    assert started["A-D1"] == 10 and started["B-D1 5"] == 11
    assert "C-D2" not in started and not links.busy and not links.waiting
