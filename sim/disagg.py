"""Prefill/decode disaggregation: a prefill pool and a decode pool, the KV cache moved between them.

    arrival -> prefill router -> prefill worker: the prompt, then the first token (TTFT)
            -> decode router -> decode worker reserves the prompt's KV blocks (in order)
            -> the two workers' links carry the KV (one transfer at a time on each)
            -> prefill frees its blocks; decode runs the rest (the wait and the transfer
               are in the gap before the second token)

A prefill worker runs each request as a request of one output token (any policy: its plans
are prompts and nothing decodes there); its KV stays held until the transfer ends
(core/handoff.py). The decode pool's router picks the worker when the first token is out; the
worker reserves blocks for the prompt's KV and a sequence slot (its policy's max_num_seqs),
waiting in arrival order while it cannot. A transfer holds the prefill worker's links and the
decode worker's (its TP ranks each send or take their shard over their own: costmodel/
transfer.py), so transfers from one worker, or to one, go one after another; it takes both
links at once when both are free, holding neither while it waits (sim/workers.py's Links). A
request of one output token finishes at the prefill worker.

With `stream_kv` the KV leaves as it is made: each prompt tile's rectangle (its tokens through
its layers) goes on the link when its iteration ends, the decode worker picked and its blocks
reserved at the first piece, so layered prefill sends layer group by layer group while the next
group computes, and chunked prefill chunk by chunk; what is left after the first token is the
last piece (or a backlog on the link). A prefill worker then runs no prefill stretches (they
commit several iterations at once), and a prompt preempted part-way sends its KV again as it
is recomputed.

Both pools' iterations, energy and idle energy are summed; the metrics add, per request, the
transfer (first byte to last), the wait before it when it starts after the first token (for
blocks, a slot, the link), and what of it is exposed after the first token, which the gap
before the second token contains.

Not yet: worker processes (the two pools are one SimPy run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, replace
from typing import Any

import numpy as np
import simpy

from core.admission import REJECTIONS, kv_blocks, screen
from core.blocks import PrefixCacheStats
from core.handoff import decode_side, release_sent
from core.metrics import DEFAULT_PERCENTILES, prefix_cache_metrics, summarize
from core.records import Recorder
from core.request import RequestState
from core.result import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS, SimResult
from core.state import PlanError
from costmodel.errors import ConfigError
from costmodel.plan import Tile
from costmodel.price import CostModel
from costmodel.transfer import NETWORK_BYTES_PER_S, NETWORK_LATENCY_S, KVLink, kv_link, transfer_s
from policies.base import Policy
from policies.registry import make_policy
from sim.clients import Clients, warmup_split
from sim.replica import Replica
from sim.router import make_router
from sim.workers import DecodeWorker, Links, PrefillWorker
from traces.request import Request


@dataclass(frozen=True)
class Pool:
    """One pool of identical workers: the GPUs and parallelism (its cost model), the policy,
    how many, and the router that spreads requests over them."""

    cost_model: CostModel
    policy: str | Callable[[], Policy]  # a spec, or a factory (a user's class, max_num_seqs)
    num_replicas: int = 1
    router: str = "round-robin"


DONE, CANCELLED = object(), object()  # a stream's last piece was sent; its prompt was preempted


@dataclass
class _Transfer:
    req_id: int
    ready_s: float  # the first token out: the KV could start moving
    start_s: float = math.nan  # on the wire
    end_s: float = math.nan
    reserved: bool = False  # the decode worker's blocks are held for it
    void: bool = False  # its stream was cancelled: nothing more of it goes on the wire


def simulate_disagg(requests: Sequence[Request], prefill: Pool, decode: Pool,
                    link: KVLink | None = None, *, seed: int = 0, block_size: int = 16,
                    gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                    max_concurrency: int | None = None, slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS,
                    slo_itl_ms: float = DEFAULT_SLO_ITL_MS, slo_tpot_ms: float | None = None,
                    slo_e2el_ms: float | None = None,
                    metric_percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                    check: bool = False, fast_forward: bool = True, stream_kv: bool = False,
                    warmup_requests: int = 0, async_scheduling: bool = False) -> SimResult:
    """Serve `requests` on a prefill pool and a decode pool (see the module note). `link`:
    each prefill GPU's link to the decode pool (default: its GPU's network port).
    `stream_kv`: send each tile's KV when its iteration ends (layer-wise for layered prefill)
    instead of the whole prompt's after its first token. `warmup_requests`: the first ones
    sent run but are left out of the metrics (sim/clients.py). `async_scheduling`: both pools'
    workers plan the next iteration while one runs (sim/replica.py), an arrived KV waiting for
    the decode worker's planning point as an arrival waits for a prefill worker's."""
    pm, dm = prefill.cost_model, decode.cost_model
    if pm.model.name != dm.model.name:
        raise ConfigError(f"the pools serve different models: {pm.model.name} and {dm.model.name}")
    for name, pool in (("prefill", prefill), ("decode", decode)):
        if not (isinstance(pool.num_replicas, int) and pool.num_replicas >= 1):
            raise ConfigError(f"the {name} pool needs at least one replica, got {pool.num_replicas}")
        make_router(pool.router, seed)  # validates the name
    link = link or kv_link(pm.hw.name)
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.req_id))
    if not ordered:
        raise ConfigError("requests is empty: a run needs at least one request")
    p_blocks, p_hidden = kv_blocks(pm, block_size, gpu_memory_utilization)
    d_blocks, d_hidden = kv_blocks(dm, block_size, gpu_memory_utilization)
    # the prefill worker holds a prompt and its first token; the decode worker the whole request
    p_screen = screen([replace(r, output_tokens=1) for r in ordered], pm, p_blocks, block_size, p_hidden)
    d_screen = screen(ordered, dm, d_blocks, block_size, d_hidden)
    reasons = {**d_screen.reasons, **p_screen.reasons}
    outputs = {r.req_id: r.output_tokens for r in ordered}

    if not 0 <= warmup_requests < len(ordered):
        raise ConfigError(f"--warmup-requests {warmup_requests} must be >= 0 and leave some of the "
                          f"{len(ordered)} requests to measure")
    warm_ids, first_measured = warmup_split(ordered, warmup_requests)
    env = simpy.Environment()
    recorder = Recorder(pm.model.num_layers)
    recorder.warmup_ids = warm_ids
    if first_measured is not None:  # the window opens at its arrival; closed loop: when sent
        recorder.count_from_s = math.inf if max_concurrency is not None else first_measured.arrival_s
    pending = [len(ordered) if max_concurrency is not None else len(ordered) - len(reasons)]
    done = env.event()
    transfers: dict[int, _Transfer] = {}

    def on_finish() -> None:
        pending[0] -= 1
        if max_concurrency is not None:
            clients.release()
        if pending[0] == 0 and not done.triggered:
            done.succeed()

    clients = Clients(env, max_concurrency, recorder, on_finish,
                      first_measured.req_id if first_measured is not None else None,
                      frozenset(reasons), block_size)

    def send(src: PrefillWorker, dst: DecodeWorker, seconds: float, record: _Transfer) -> Any:
        """One piece, once both `src`'s links and `dst`'s are free (sim/workers.py's Links)."""
        granted = links.take(src.idx, dst.idx)
        try:
            yield granted
            if record.void:  # cancelled while it waited for the links
                return
            if math.isnan(record.start_s):
                record.start_s = env.now
            yield env.timeout(seconds)
            record.end_s = env.now
        finally:
            links.release(src.idx, dst.idx, granted)

    def move(src: PrefillWorker, sent: RequestState, dst: DecodeWorker, req: RequestState,
             reserved: simpy.Event, pieces: simpy.Store | None) -> Any:
        """One request's KV from the prefill worker `src` to the decode worker `dst` (a SimPy
        process): the whole prompt's at once, or the `pieces` (seconds on the wire; DONE after
        the last; CANCELLED when the prompt was preempted) as its iterations make them."""
        record = transfers[sent.req_id]
        if not (yield reserved):  # withdrawn while it waited: the stream was cancelled
            return
        record.reserved = True
        if pieces is None:
            yield from send(src, dst, transfer_s(pm, sent.prompt_len, link, receiver=dm), record)
        else:
            while (seconds := (yield pieces.get())) is not DONE:
                if record.void:  # its blocks were given back by cancel()
                    return
                yield from send(src, dst, seconds, record)
        release_sent(src.state, sent)
        src.wake()  # its policy may have been waiting for those blocks
        req.first_token_s = req.last_token_s = sent.first_token_s
        dst.receive(req)

    streams: dict[int, tuple[simpy.Store, DecodeWorker, RequestState, _Transfer]] = {}

    def start(src: PrefillWorker, sent: RequestState, pieces: simpy.Store | None) -> None:
        dst = d_reps[d_router.pick(d_reps)]
        req = decode_side(sent, outputs[sent.req_id])
        record = transfers[sent.req_id] = _Transfer(
            sent.req_id, env.now if pieces is None else math.nan)
        if pieces is not None:
            streams[sent.req_id] = (pieces, dst, req, record)
        # asked now, not when the process first runs: a cancel at this instant must find it
        env.process(move(src, sent, dst, req, dst.reserve(req), pieces))

    def stream(src: PrefillWorker, plan: tuple[Tile, ...], end_s: float) -> None:
        """The KV each prompt tile made this iteration leaves now (stream_kv); a stream starts
        with its prompt's cached prefix, which the decode worker needs too."""
        held = {r.req_id: r for r in (*src.state.running, *src.state.in_transit)}
        for rid, t0, t1, l0, l1, _cached, _logits in plan:
            if outputs[rid] == 1 or t1 <= t0:  # a one-token request ends at the prefill worker
                continue
            if rid not in streams:
                start(src, held[rid], simpy.Store(env))
                if t0 > 0:
                    streams[rid][0].put(transfer_s(pm, t0, link, receiver=dm))
            streams[rid][0].put(transfer_s(pm, t1 - t0, link, l1 - l0, receiver=dm))

    def cancel(sent: RequestState) -> None:
        """A streaming prompt preempted on its prefill worker: its stream is void and its
        reservation given back (the recompute starts another)."""
        entry = streams.pop(sent.req_id, None)
        if entry is not None:
            pieces, dst, req, record = entry
            record.void = True  # no piece of it goes on the wire from now on
            dst.withdraw(req)
            pieces.put(CANCELLED)  # wakes its process if it waits for a piece

    def unreserved(src: PrefillWorker) -> bool:
        """Whether some KV finished on `src` still waits for decode blocks."""
        return any(not transfers[r.req_id].reserved for r in src.state.in_transit)

    def hand_off(src: PrefillWorker, sent: RequestState) -> None:
        rid = sent.req_id
        if outputs[rid] == 1:  # nothing to decode: it ends here
            release_sent(src.state, sent)
            recorder.finished(sent, src.idx)
            on_finish()
            return
        if stream_kv:
            transfers[rid].ready_s = env.now
            streams.pop(rid)[0].put(DONE)  # after its last piece
        else:
            start(src, sent, None)

    def args(pool: Pool, i: int, cm: CostModel, blocks: int, hidden: float) -> tuple[Any, ...]:
        policy = make_policy(pool.policy) if isinstance(pool.policy, str) else pool.policy()
        return (env, i, policy, cm, blocks, block_size, hidden, recorder)

    p_reps = [PrefillWorker(*args(prefill, i, pm, p_blocks, p_hidden), check=check,
                            fast_forward=fast_forward, async_scheduling=async_scheduling,
                            hand_off=hand_off,
                            stream=stream if stream_kv else None,
                            cancel=cancel if stream_kv else None,
                            unreserved=unreserved if stream_kv else None)
              for i in range(prefill.num_replicas)]
    d_reps = [DecodeWorker(*args(decode, prefill.num_replicas + i, dm, d_blocks, d_hidden),
                           check=check, fast_forward=fast_forward, on_finish=on_finish,
                           async_scheduling=async_scheduling)
              for i in range(decode.num_replicas)]
    for rep in p_reps:
        rep.state.set_prefix_caching(enable_prefix_caching)
    for worker in d_reps:  # the KV arrives whole: nothing is matched there
        worker.state.set_prefix_caching(False)
    p_router, d_router = make_router(prefill.router, seed), make_router(decode.router, seed + 1)
    pools: tuple[tuple[Sequence[Replica], Any, int], ...] = (
        (p_reps, p_router, 0), (d_reps, d_router, prefill.num_replicas))
    for pool_reps, router, first in pools:
        if router.ordered:  # it keeps its workers ordered by load: tell it when one changes
            for member in pool_reps:
                member.on_load = lambda idx, router=router, first=first: router.changed(idx - first)
    links = Links(env)

    def open_window() -> None:  # no fast-forwarded run may straddle the window's start
        for worker in (*p_reps, *d_reps):
            worker.wake()
    clients.on_window_open = open_window

    def submit(state: RequestState) -> None:
        state.max_tokens = 1  # the prefill worker's share: the prompt and its first token
        p_reps[p_router.pick(p_reps)].submit(state)

    env.process(clients.run(ordered if max_concurrency is not None else
                            [r for r in ordered if r.req_id not in reasons], submit))
    while not done.triggered:
        try:
            env.step()
        except simpy.core.EmptySchedule:  # nothing left to happen with requests pending
            unfinished = pending[0]
            raise PlanError(f"internal: the disaggregated run stalled at {env.now:.6g} s with "
                            f"{unfinished} requests unfinished: a policy that stopped "
                            "scheduling, or KV waiting on both sides"
                            ) from None
    end_s = env.now
    if pending[0] == 0:  # all served: every block on both sides is back (core/handoff.py)
        for any_worker in (*p_reps, *d_reps):
            st = any_worker.state
            if st.running or st.waiting or st.in_transit or st.pool.num_refs:
                raise PlanError(f"internal: worker {any_worker.idx} still holds {st.pool.num_refs} KV "
                                f"block references after the run ({len(st.in_transit)} in transit)")
    for r in ordered:  # rejected up front (open loop) or never finished
        if r.req_id not in recorder.recorded_ids:
            recorder.rejected(RequestState(r.req_id, r.arrival_s, r.prompt_tokens, r.output_tokens),
                              end_s)
    return _result(recorder, p_reps, d_reps, ordered, end_s, transfers, reasons,
                   {"slo_ttft_ms": slo_ttft_ms, "slo_itl_ms": slo_itl_ms,
                    "slo_tpot_ms": slo_tpot_ms, "slo_e2el_ms": slo_e2el_ms,
                    "percentiles": tuple(metric_percentiles)})


def run_disaggregated(study: Any, cm: CostModel, requests: Sequence[Request],
                      check: bool) -> list[SimResult]:
    """A study's disaggregated runs (sim/study.py's keys): each compared policy on the prefill
    pool, the decode policy (default: the same) on the decode pool."""
    if study.prefill_replicas is None or study.decode_replicas is None:
        raise ConfigError("prefill_replicas and decode_replicas: give both (a disaggregated run "
                          "needs both pools) or neither")
    for key, bad, why in (("replicas", study.replicas != 1, "the pools' counts replace it"),
                          ("workers", study.workers != 1, "one process only, for now")):
        if bad:
            raise ConfigError(f"{key}: leave it out of a disaggregated run ({why})")
    dm = study.decode_cost_model(cm)
    link = None
    if study.kv_link_gb_per_s is not None or study.kv_link_latency_us is not None:
        preset = kv_link(cm.hw.name) if cm.hw.name in NETWORK_BYTES_PER_S else None
        bw = (study.kv_link_gb_per_s * 1e9 if study.kv_link_gb_per_s is not None
              else preset.bytes_per_s if preset else None)
        if bw is None:
            raise ConfigError(f"kv_link_gb_per_s: no preset for {cm.hw.name}; give it")
        lat = (study.kv_link_latency_us * 1e-6 if study.kv_link_latency_us is not None
               else preset.latency_s if preset else NETWORK_LATENCY_S)
        link = KVLink(bw, lat, "the study's kv_link_gb_per_s / kv_link_latency_us")
    out = []
    for spec in study.policies:
        decode = study.policy_factory(study.decode_policy or spec)
        out.append(simulate_disagg(
            requests, Pool(cm, study.policy_factory(spec), study.prefill_replicas, study.router),
            Pool(dm, decode, study.decode_replicas, study.router), link, seed=study.seed,
            block_size=study.block_size, gpu_memory_utilization=study.gpu_memory_utilization,
            enable_prefix_caching=study.enable_prefix_caching,
            max_concurrency=study.max_concurrency, slo_ttft_ms=study.slo_ttft_ms,
            slo_itl_ms=study.slo_itl_ms, slo_tpot_ms=study.slo_tpot_ms,
            slo_e2el_ms=study.slo_e2el_ms, metric_percentiles=study.metric_percentiles,
            check=check, stream_kv=study.stream_kv, async_scheduling=study.async_scheduling,
            warmup_requests=study.warmup(len(requests))))
    return out


def _result(recorder: Recorder, p_reps: list[PrefillWorker], d_reps: list[DecodeWorker],
            ordered: list[Request], end_s: float, transfers: dict[int, _Transfer],
            reasons: dict[int, str], slo: dict[str, Any]) -> SimResult:
    start_s = ordered[0].arrival_s
    if recorder.count_from_s is not None and math.isfinite(recorder.count_from_s):  # a warm-up
        start_s = recorder.count_from_s
    idle_j = sum(max(0.0, end_s - start_s - recorder.busy_s.get(rep.idx, 0.0)) * rep.cost.idle_power_w()
                 for rep in (*p_reps, *d_reps))
    req_df = recorder.requests_frame()
    for col in ("kv_ready_s", "kv_start_s", "kv_end_s"):  # when the KV could move, moved, arrived
        field = col.removeprefix("kv_")
        times = {rid: getattr(t, field) for rid, t in transfers.items()}
        req_df[col] = [times.get(rid, math.nan) for rid in req_df["req_id"]]
    gaps = recorder.request_gaps()
    req_df["second_token_gap_ms"] = math.nan  # what disaggregation adds: the KV's move and wait
    if gaps is not None and len(gaps.index):
        has = gaps.index[:, 2] > 0
        first_gap = dict(zip(gaps.index[has, 0].tolist(),
                             (gaps.values[gaps.index[has, 1]] * 1e3).tolist(), strict=True))
        req_df["second_token_gap_ms"] = [first_gap.get(rid, math.nan) for rid in req_df["req_id"]]
    it_df = recorder.iterations_frame().sort_values(["start_s", "replica"], kind="stable")
    metrics = summarize(req_df, recorder, end_s=end_s, idle_energy_j=idle_j, **slo)
    moved = [t for t in transfers.values()
             if math.isfinite(t.end_s) and t.req_id not in recorder.warmup_ids]
    wire_ms = np.array([t.end_s - t.start_s for t in moved]) * 1e3
    wait_ms = np.array([max(0.0, t.start_s - t.ready_s) for t in moved]) * 1e3
    exposed_ms = np.array([t.end_s - t.ready_s for t in moved]) * 1e3  # after the first token

    def stat(values: np.ndarray, fn: Callable[[np.ndarray], float]) -> float | None:
        return float(fn(values)) if len(values) else None
    p_name, d_name = p_reps[0].policy.name, d_reps[0].policy.name
    policy = p_name if p_name == d_name else f"{p_name}+{d_name}"  # names its results folder
    p_gpus = len(p_reps) * p_reps[0].cost.parallel.num_gpus
    d_gpus = len(d_reps) * d_reps[0].cost.parallel.num_gpus
    metrics = {"policy": policy, "replicas": len(p_reps) + len(d_reps), "gpus": p_gpus + d_gpus,
               "prefill_replicas": len(p_reps), "decode_replicas": len(d_reps),
               "prefill_gpus": p_gpus, "decode_gpus": d_gpus, "prefill_policy": p_name,
               "decode_policy": d_name, **metrics,
               "kv_transfers": len(moved),
               "mean_kv_transfer_ms": stat(wire_ms, np.mean),
               "p99_kv_transfer_ms": stat(wire_ms, lambda v: np.percentile(v, 99)),
               "mean_kv_wait_ms": stat(wait_ms, np.mean),
               "p99_kv_wait_ms": stat(wait_ms, lambda v: np.percentile(v, 99)),
               "mean_kv_exposed_ms": stat(exposed_ms, np.mean),
               "p99_kv_exposed_ms": stat(exposed_ms, lambda v: np.percentile(v, 99)),
               **{key: list(reasons.values()).count(key) for key in REJECTIONS},
               **prefix_cache_metrics(PrefixCacheStats(*map(sum, zip(
                   *(astuple(rep.state.pool.stats()) for rep in p_reps), strict=True))),
                   p_reps[0].state.enable_prefix_caching)}
    return SimResult(policy, metrics, req_df, it_df.reset_index(drop=True), recorder.request_gaps(),
                     rejections={rid: REJECTIONS[key] for rid, key in reasons.items()})
