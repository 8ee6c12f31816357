"""Prefill/decode disaggregation: a prefill pool and a decode pool, the KV cache moved between them.

    arrival -> prefill router -> prefill worker: the prompt, then the first token (TTFT)
            -> decode router -> decode worker reserves the prompt's KV blocks (in order)
            -> the prefill worker's link carries the KV (one transfer at a time, in order)
            -> prefill frees its blocks; decode runs the rest (the wait and the transfer
               are in the gap before the second token)

A prefill worker runs each request as a request of one output token (any policy: its plans
are prompts and nothing decodes there); its KV stays held until the transfer ends
(core/handoff.py). The decode pool's router picks the worker when the first token is out; the
worker reserves blocks for the prompt's KV and a sequence slot (its policy's max_num_seqs),
waiting in arrival order while it cannot. Transfers leave one prefill worker one after another
(its TP ranks each send their shard over their own link: costmodel/transfer.py), so transfers
contend for the sender's links; the receiving side is not a bottleneck here. A request of one
output token finishes at the prefill worker. Both pools' iterations, energy and idle energy are
summed; the metrics add the KV transfer (the wire) and the wait before it (blocks, a slot, the
link) per request, and the second-token gap they end in.

Not yet: layer-wise transfer (layered prefill sending each layer group's KV while the next
computes), async scheduling, warm-up requests, worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import simpy

from core.admission import REJECTIONS, kv_blocks, screen
from core.handoff import decode_side, release_sent, reserve_incoming
from core.metrics import DEFAULT_PERCENTILES, summarize
from core.records import Recorder
from core.request import RequestState
from core.result import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS, SimResult
from core.state import PlanError
from costmodel.errors import ConfigError
from costmodel.price import CostModel
from costmodel.transfer import KVLink, kv_link, transfer_s
from policies.registry import make_policy
from sim.clients import Clients
from sim.replica import Replica
from sim.router import make_router
from traces.request import Request


@dataclass(frozen=True)
class Pool:
    """One pool of identical workers: the GPUs and parallelism (its cost model), the policy,
    how many, and the router that spreads requests over them."""

    cost_model: CostModel
    policy: str
    num_replicas: int = 1
    router: str = "round-robin"


@dataclass
class _Transfer:
    req_id: int
    ready_s: float  # the first token out: the KV could start moving
    start_s: float = math.nan  # on the wire
    end_s: float = math.nan


def simulate_disagg(requests: Sequence[Request], prefill: Pool, decode: Pool,
                    link: KVLink | None = None, *, seed: int = 0, block_size: int = 16,
                    gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True,
                    max_concurrency: int | None = None, slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS,
                    slo_itl_ms: float = DEFAULT_SLO_ITL_MS, check: bool = False,
                    fast_forward: bool = True) -> SimResult:
    """Serve `requests` on a prefill pool and a decode pool (see the module note). `link`:
    each prefill GPU's link to the decode pool (default: its GPU's network port)."""
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

    env = simpy.Environment()
    recorder = Recorder(pm.model.num_layers)
    pending = [len(ordered) if max_concurrency is not None else len(ordered) - len(reasons)]
    done = env.event()
    transfers: dict[int, _Transfer] = {}

    def on_finish() -> None:
        pending[0] -= 1
        if max_concurrency is not None:
            clients.release()
        if pending[0] == 0 and not done.triggered:
            done.succeed()

    clients = Clients(env, max_concurrency, recorder, on_finish, None, frozenset(reasons), block_size)

    def workers(pool: Pool, first_id: int, cm: CostModel, blocks: int, hidden: float,
                caching: bool) -> list[Replica]:
        reps = [Replica(env, first_id + i, make_policy(pool.policy), cm, blocks, block_size,
                        hidden, recorder, check=check, fast_forward=fast_forward)
                for i in range(pool.num_replicas)]
        for rep in reps:
            rep.state.set_prefix_caching(caching)
        return reps

    p_reps = workers(prefill, 0, pm, p_blocks, p_hidden, enable_prefix_caching)
    d_reps = workers(decode, prefill.num_replicas, dm, d_blocks, d_hidden, False)
    p_router, d_router = make_router(prefill.router, seed), make_router(decode.router, seed + 1)
    links = {rep.idx: simpy.Resource(env, capacity=1) for rep in p_reps}
    waiting: dict[int, list[tuple[RequestState, simpy.Event]]] = {rep.idx: [] for rep in d_reps}

    def seq_limit(rep: Replica) -> int | None:
        limit = getattr(rep.policy, "max_num_seqs", None)
        return limit if isinstance(limit, int) else None

    def reserve_waiting(rep: Replica) -> None:
        """Blocks freed on a decode worker: reserve for the transfers waiting there, in order."""
        queue = waiting[rep.idx]
        while queue and reserve_incoming(rep.state, queue[0][0], seq_limit(rep)):
            queue.pop(0)[1].succeed()

    for rep in d_reps:
        def finished(rep: Replica = rep) -> None:
            on_finish()
            reserve_waiting(rep)
        rep._on_finish = finished

    def move(src: Replica, sent: RequestState) -> Any:
        """One request's KV from the prefill worker `src` to a decode worker (a SimPy process)."""
        dst = d_reps[d_router.pick(d_reps)]
        req = decode_side(sent, outputs[sent.req_id])
        record = transfers[sent.req_id] = _Transfer(sent.req_id, env.now)
        if waiting[dst.idx] or not reserve_incoming(dst.state, req, seq_limit(dst)):
            reserved = env.event()
            waiting[dst.idx].append((req, reserved))
            yield reserved
        with links[src.idx].request() as slot:
            yield slot
            record.start_s = env.now
            yield env.timeout(transfer_s(pm, sent.prompt_len, link))
            record.end_s = env.now
        release_sent(src.state, sent)
        src.wake()  # its policy may have been waiting for those blocks
        dst.receive(req)

    def hand_off(src: Replica, sent: RequestState) -> None:
        if outputs[sent.req_id] == 1:  # nothing to decode: it ends here
            release_sent(src.state, sent)
            recorder.finished(sent, src.idx)
            on_finish()
            return
        env.process(move(src, sent))

    for rep in p_reps:
        rep.state.keep_finished_kv = True
        rep.hand_off = hand_off

    def submit(state: RequestState) -> None:
        state.max_tokens = 1  # the prefill worker's share: the prompt and its first token
        p_reps[p_router.pick(p_reps)].submit(state)

    env.process(clients.run(ordered if max_concurrency is not None else
                            [r for r in ordered if r.req_id not in reasons], submit))
    while not done.triggered:
        try:
            env.step()
        except simpy.core.EmptySchedule:
            break
    end_s = env.now
    if pending[0] == 0:  # all served: every block on both sides is back (core/handoff.py)
        for rep in (*p_reps, *d_reps):
            st = rep.state
            if st.running or st.waiting or st.in_transit or st.pool.num_refs:
                raise PlanError(f"internal: worker {rep.idx} still holds {st.pool.num_refs} KV "
                                f"block references after the run ({len(st.in_transit)} in transit)")
    for r in ordered:  # rejected up front (open loop) or never finished
        if r.req_id not in recorder.recorded_ids:
            recorder.rejected(RequestState(r.req_id, r.arrival_s, r.prompt_tokens, r.output_tokens),
                              end_s)
    return _result(recorder, p_reps, d_reps, ordered, end_s, transfers, reasons,
                   {"slo_ttft_ms": slo_ttft_ms, "slo_itl_ms": slo_itl_ms})


def _result(recorder: Recorder, p_reps: list[Replica], d_reps: list[Replica],
            ordered: list[Request], end_s: float, transfers: dict[int, _Transfer],
            reasons: dict[int, str], slo: dict[str, Any]) -> SimResult:
    start_s = ordered[0].arrival_s
    idle_j = sum(max(0.0, end_s - start_s - recorder.busy_s.get(rep.idx, 0.0)) * rep.cost.idle_power_w()
                 for rep in (*p_reps, *d_reps))
    req_df = recorder.requests_frame()
    for col in ("kv_ready_s", "kv_start_s", "kv_end_s"):  # when the KV could move, moved, arrived
        field = col.removeprefix("kv_")
        times = {rid: getattr(t, field) for rid, t in transfers.items()}
        req_df[col] = [times.get(rid, math.nan) for rid in req_df["req_id"]]
    it_df = recorder.iterations_frame().sort_values(["start_s", "replica"], kind="stable")
    metrics = summarize(req_df, recorder, end_s=end_s, idle_energy_j=idle_j,
                        percentiles=DEFAULT_PERCENTILES, **slo)
    moved = [t for t in transfers.values() if math.isfinite(t.end_s)]
    wire_ms = np.array([t.end_s - t.start_s for t in moved]) * 1e3
    wait_ms = np.array([t.start_s - t.ready_s for t in moved]) * 1e3

    def stat(values: np.ndarray, fn: Callable[[np.ndarray], float]) -> float | None:
        return float(fn(values)) if len(values) else None
    policy = f"{p_reps[0].policy.name} | {d_reps[0].policy.name}"
    p_gpus = len(p_reps) * p_reps[0].cost.parallel.num_gpus
    d_gpus = len(d_reps) * d_reps[0].cost.parallel.num_gpus
    metrics = {"policy": policy, "replicas": len(p_reps) + len(d_reps), "gpus": p_gpus + d_gpus,
               "prefill_replicas": len(p_reps), "decode_replicas": len(d_reps),
               "prefill_gpus": p_gpus, "decode_gpus": d_gpus, **metrics,
               "kv_transfers": len(moved),
               "mean_kv_transfer_ms": stat(wire_ms, np.mean),
               "p99_kv_transfer_ms": stat(wire_ms, lambda v: np.percentile(v, 99)),
               "mean_kv_wait_ms": stat(wait_ms, np.mean),
               "p99_kv_wait_ms": stat(wait_ms, lambda v: np.percentile(v, 99)),
               **{key: list(reasons.values()).count(key) for key in REJECTIONS}}
    return SimResult(policy, metrics, req_df, it_df.reset_index(drop=True), recorder.request_gaps(),
                     rejections={rid: REJECTIONS[key] for rid, key in reasons.items()})
