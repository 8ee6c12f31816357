"""A serving cluster: N data-parallel replicas behind a router, fed by a request trace.

`simulate` builds the SimPy environment, one arrival process that routes each request at its
arrival time, and one process per replica (sim/replica.py), runs to the last completion and
returns the per-request and per-iteration tables with the summary metrics. Requests that cannot
fit are rejected up front, as vLLM rejects them (core/admission.py, the engine's rule too), and
counted by reason in the metrics (REJECTIONS); when none of them fits, simulating is a
ConfigError. With a round-robin router the
replicas can be split over worker processes with identical results. With `max_concurrency`
the requests come from closed-loop clients instead (sim/clients.py), and the first
`warmup_requests` are simulated but left out of the metrics.

Prefix caching (vLLM's automatic prefix caching, `enable_prefix_caching`, on by default) runs in
each replica's block pool (core/blocks.py); requests carry their content as trace hash ids
(Mooncake, the shared-prefix workload). The metrics add the pools' counts summed over replicas
(PREFIX_CACHE_KEYS; warm-up requests included): vLLM's `prefix_cache_hit_rate` = hit tokens /
queried tokens, counted at every admission (a preempted request's recompute counts again).

`simulate` is also a Python API: its arguments are checked as the CLI checks a study (a
ConfigError naming the argument, and for a request its position and id), so a zero, fractional
or negative token count, a NaN or infinite arrival or a repeated id never reaches SimPy.
"""

from __future__ import annotations

import gc
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any

import simpy

# REJECTIONS, SimResult, the SLO defaults and policy_folder live in core/ (the engine's too)
from core.admission import REJECTIONS as REJECTIONS
from core.admission import kv_blocks, screen
from core.blocks import PrefixCacheStats
from core.metrics import DEFAULT_PERCENTILES, prefix_cache_metrics, summarize
from core.records import Recorder
from core.request import RequestState
from core.result import DEFAULT_SLO_ITL_MS as DEFAULT_SLO_ITL_MS
from core.result import DEFAULT_SLO_TTFT_MS as DEFAULT_SLO_TTFT_MS
from core.result import SimResult as SimResult
from core.result import policy_folder as policy_folder
from costmodel.errors import ConfigError
from costmodel.price import CostModel
from policies.base import Policy
from policies.registry import make_policy
from sim.clients import Clients, warmup_split
from sim.replica import Replica
from sim.router import make_router
from traces._checks import MAX_TIME_S, MAX_TOKENS, shown
from traces.request import Request
from traces.workload import MAX_REQUESTS

# Each replica is simulated and held in memory (about 1.5 KB before it runs anything): far above
# any fleet, and the largest count `layersim capacity` tries is 4,096.
MAX_REPLICAS = 100_000
MAX_WORKERS = 256  # processes forked at once; more than any machine's cores


@dataclass
class _Shard:
    """What one process simulated: a subset of the replicas and the requests routed to them."""

    recorder: Recorder
    busy_s: list[float]
    replica_ids: list[int]
    end_s: float
    policy_name: str
    prefix_stats: list[int]  # PrefixCacheStats fields summed over this shard's replicas


def simulate(requests: Sequence[Request], cost_model: CostModel,
             policy: str | Callable[[], Policy], *, num_replicas: int = 1,
             router: str = "round-robin", seed: int = 0, block_size: int = 16,
             gpu_memory_utilization: float = 0.9, activation_reserve_bytes: float | None = None,
             slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS, slo_itl_ms: float = DEFAULT_SLO_ITL_MS,
             slo_tpot_ms: float | None = None, slo_e2el_ms: float | None = None,
             metric_percentiles: Sequence[float] = DEFAULT_PERCENTILES,
             check: bool = False, fast_forward: bool = True, stream_dir: Path | None = None,
             progress: bool = False, workers: int = 1, max_concurrency: int | None = None,
             warmup_requests: int = 0, enable_prefix_caching: bool = True,
             async_scheduling: bool = False, executor: Any = None,
             pool_gaps: bool = True) -> SimResult:
    """Simulate `requests` on `num_replicas` replicas; see the module note.

    `workers` > 1 splits the replicas over processes. Only a router that ignores replica state
    (round-robin) allows it: each process then sees exactly the requests the single-process run
    would route to its replicas, so the results are the same, byte for byte. Closed-loop clients
    (`max_concurrency`) cannot be split so: each one waits on whichever replica finishes first.
    The shards run in forked processes, or with `executor` (search/executor.py: a process pool,
    or Ray on this machine or a cluster, where `stream_dir` must be a folder every node shares)
    as tasks, each given its arguments pickled: the same results. `pool_gaps=False` keeps no
    pooled inter-token gaps (core/records.py): pooled ITL metrics None, no `itls`.
    """
    requests = _checked_requests(requests)
    _check_args(num_replicas=(num_replicas, 1, MAX_REPLICAS), seed=(seed, 0, 2**63 - 1),
                block_size=(block_size, 1, MAX_TOKENS), workers=(workers, 1, MAX_WORKERS),
                max_concurrency=(max_concurrency, 1, None),
                warmup_requests=(warmup_requests, 0, MAX_REQUESTS))
    _check_numbers(slo_ttft_ms=slo_ttft_ms, slo_itl_ms=slo_itl_ms, slo_tpot_ms=slo_tpot_ms,
                   slo_e2el_ms=slo_e2el_ms)
    if not _real(gpu_memory_utilization) or not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got "
                          f"{shown(gpu_memory_utilization)}")
    if activation_reserve_bytes is not None and not (
            _real(activation_reserve_bytes) and 0 <= activation_reserve_bytes < math.inf):
        raise ConfigError(f"activation_reserve_bytes must be a finite number >= 0, got "
                          f"{shown(activation_reserve_bytes)}")
    _check_percentiles(metric_percentiles)
    if not isinstance(enable_prefix_caching, bool):
        raise ConfigError(f"enable_prefix_caching must be true or false, got "
                          f"{shown(enable_prefix_caching)}")
    if not isinstance(router, str):
        raise ConfigError(f"router must be a router's name, got {shown(router)}")
    if not (isinstance(policy, str) or callable(policy)):
        raise ConfigError(f"policy must be a spec or a callable returning a Policy, got "
                          f"{shown(policy)}")
    make_router(router, seed)  # validates the name
    workers = max(1, min(workers, num_replicas))
    if workers > 1 and router != "round-robin":
        raise ConfigError(f"--workers {workers} needs the round-robin router (got {router}): other "
                          "routers look at every replica's load")
    if workers > 1 and max_concurrency is not None:
        raise ConfigError(f"--workers {workers} cannot split closed-loop clients (--max-concurrency): "
                          "each client's next request waits on whichever replica finishes first")
    num_blocks, hidden_blocks = kv_blocks(cost_model, block_size, gpu_memory_utilization,
                                          activation_reserve_bytes)
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.req_id))
    max_context = cost_model.model.max_context
    screening = screen(ordered, cost_model, num_blocks, block_size, hidden_blocks)
    servable, too_long = screening.servable, screening.rejected
    if not 0 <= warmup_requests < max(len(ordered), 1):
        raise ConfigError(f"--warmup-requests {warmup_requests} must be >= 0 and leave some of the "
                          f"{len(ordered)} requests to measure")
    warm_ids, first_measured = warmup_split(ordered, warmup_requests)
    closed = max_concurrency is not None

    def _shard_args(shard: int) -> tuple[Any, ...]:
        """_run_replicas's arguments for one shard: its replicas and the requests routed to
        them (round-robin), all picklable (a shard may run in another process or machine)."""
        ids = list(range(shard, num_replicas, workers))
        mine = ordered if closed else servable if workers == 1 else [
            r for i, r in enumerate(servable) if i % num_replicas % workers == shard]
        sub_dir = None
        if stream_dir is not None:
            sub_dir = stream_dir if workers == 1 else stream_dir / f"shard{shard:03d}"
            sub_dir.mkdir(parents=True, exist_ok=True)
        return (mine, cost_model, policy, ids, router, seed, num_blocks, block_size,
                hidden_blocks, check, fast_forward, sub_dir, progress and shard == 0, len(mine),
                max_concurrency, warm_ids, first_measured,
                frozenset(r.req_id for r in too_long) if closed else frozenset(),
                enable_prefix_caching, async_scheduling, pool_gaps)

    def run_shard(shard: int) -> _Shard:
        return _run_replicas(*_shard_args(shard))

    if workers == 1:
        shards = [run_shard(0)]
    elif executor is not None:  # each shard a task (a local pool, or Ray across machines)
        from search.executor import map_tasks
        shards = map_tasks(executor, _run_replicas, [
            _shard_args(shard) for shard in range(workers)])
    else:
        import multiprocessing as mp
        global _SHARD_JOB
        _SHARD_JOB = run_shard  # forked workers inherit it; closures do not pickle
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                shards = pool.map(_call_shard, range(workers))
        finally:
            _SHARD_JOB = None
    slo = {"slo_ttft_ms": slo_ttft_ms, "slo_itl_ms": slo_itl_ms, "slo_tpot_ms": slo_tpot_ms,
           "slo_e2el_ms": slo_e2el_ms, "percentiles": tuple(metric_percentiles)}
    result = _merge(shards, [] if closed else too_long, ordered[:1], cost_model, num_replicas,
                    slo)
    pools = PrefixCacheStats(*map(sum, zip(*(s.prefix_stats for s in shards), strict=True)))
    result.metrics.update(max_context=max_context, **screening.counts(),
                          **prefix_cache_metrics(pools, enable_prefix_caching))
    return replace(result, rejections=screening.texts())


def _int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _checked_requests(requests: object) -> list[Request]:
    """The requests as a list, each checked as a trace loader would have checked it."""
    if isinstance(requests, (str, bytes)) or not hasattr(requests, "__iter__"):
        raise ConfigError(f"requests must be a sequence of traces.Request, got {shown(requests)}")
    items = list(requests)  # type: ignore[call-overload]
    if not items:  # an empty run has no metrics to report
        raise ConfigError("requests is empty: a run needs at least one request")
    if len(items) > MAX_REQUESTS:
        raise ConfigError(f"requests: {len(items):,} is more than the {MAX_REQUESTS:,} a run may "
                          "simulate")
    seen: set[int] = set()
    for i, r in enumerate(items):
        if not isinstance(r, Request):
            raise ConfigError(f"requests[{i}] is not a traces.Request: {shown(r)}")
        if not _int(r.req_id) or not -(2**63) <= r.req_id < 2**63:  # type: ignore[operator]
            raise ConfigError(f"requests[{i}]: req_id must be a 64-bit integer, got {shown(r.req_id)}")
        where = f"requests[{i}] (req_id {r.req_id})"
        if r.req_id in seen:
            raise ConfigError(f"{where}: req_id repeats an earlier request's; ids must be distinct")
        seen.add(int(r.req_id))
        for name, tokens in (("prompt_tokens", r.prompt_tokens), ("output_tokens", r.output_tokens)):
            if not _int(tokens) or not 1 <= tokens <= MAX_TOKENS:
                raise ConfigError(f"{where}: {name} must be an integer from 1 to {MAX_TOKENS:,}, "
                                  f"got {shown(tokens)}")
        if not _real(r.arrival_s) or not 0 <= r.arrival_s <= MAX_TIME_S:
            raise ConfigError(f"{where}: arrival_s must be a number of seconds from 0 to "
                              f"{MAX_TIME_S:.0e}, got {shown(r.arrival_s)}")
    return items


def _check_args(**ranges: tuple[object, int, int | None]) -> None:
    """Integer arguments: name=(value, lowest, highest or None); max_concurrency may be None."""
    for name, (value, low, high) in ranges.items():
        if value is None and name == "max_concurrency":
            continue
        if not _int(value) or value < low or (high is not None and value > high):  # type: ignore[operator]
            span = f"from {low:,} to {high:,}" if high is not None else f">= {low}"
            raise ConfigError(f"{name} must be an integer {span}, got {shown(value)}")


def _check_numbers(**values: float | None) -> None:
    """SLO targets: positive finite milliseconds (None: not part of the SLO, where allowed)."""
    for name, value in values.items():
        if value is None and name in ("slo_tpot_ms", "slo_e2el_ms"):
            continue
        if not _real(value) or not 0 < value < math.inf:  # type: ignore[operator]
            raise ConfigError(f"{name} must be a positive finite number of ms, got {shown(value)}")


def _check_percentiles(values: object) -> None:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"metric_percentiles must be a list of numbers, got {shown(values)}")
    bad = [v for v in values if not _real(v) or not 0 < v < 100]  # type: ignore[attr-defined]
    if bad:
        raise ConfigError(f"metric_percentiles must be between 0 and 100, got {shown(bad)}")


_SHARD_JOB: Callable[[int], _Shard] | None = None


def _call_shard(shard: int) -> _Shard:
    assert _SHARD_JOB is not None
    return _SHARD_JOB(shard)


def _run_replicas(requests: list[Request], cost_model: CostModel,
                  policy: str | Callable[[], Policy], replica_ids: list[int], router: str,
                  seed: int, num_blocks: int, block_size: int, hidden_blocks: float, check: bool,
                  fast_forward: bool, stream_dir: Path | None, progress: bool,
                  total: int, max_concurrency: int | None = None,
                  warmup_ids: set[int] | None = None, first_measured: Request | None = None,
                  rejected: frozenset[int] = frozenset(),
                  enable_prefix_caching: bool = True, async_scheduling: bool = False,
                  pool_gaps: bool = True) -> _Shard:
    def new_policy() -> Policy:
        return make_policy(policy) if isinstance(policy, str) else policy()

    env = simpy.Environment()
    recorder = Recorder(cost_model.model.num_layers, stream_dir, pool_gaps=pool_gaps)
    recorder.warmup_ids = warmup_ids or set()
    closed = max_concurrency is not None
    if first_measured is not None:  # the window opens at its arrival; closed loop: when sent
        recorder.count_from_s = math.inf if closed else first_measured.arrival_s
    done = env.event()
    pending = [len(requests)]  # closed loop: rejected ones too, done when their turn comes

    def on_finish() -> None:
        pending[0] -= 1
        if closed:
            clients.release()
        if pending[0] == 0 and not done.triggered:
            done.succeed()

    clients = Clients(env, max_concurrency, recorder, on_finish,
                      first_measured.req_id if first_measured is not None else None, rejected,
                      block_size)

    replicas = [Replica(env, rid, new_policy(), cost_model, num_blocks, block_size, hidden_blocks,
                        recorder, check=check, fast_forward=fast_forward, on_finish=on_finish,
                        async_scheduling=async_scheduling)
                for rid in replica_ids]
    for rep in replicas:
        rep.state.set_prefix_caching(enable_prefix_caching)
    picker = make_router(router, seed)

    def open_window() -> None:  # no fast-forwarded run may straddle the window's start
        for rep in replicas:
            rep.wake()
    clients.on_window_open = open_window
    if first_measured is not None and not closed and all(
            r.req_id != first_measured.req_id for r in requests):
        # the request that opens the window is another shard's (--workers) or rejected: open
        # it here at its arrival all the same
        def open_at_arrival():  # type: ignore[no-untyped-def]
            yield env.timeout(first_measured.arrival_s)
            open_window()
        env.process(open_at_arrival())
    if picker.ordered:  # it keeps the replicas ordered by load: tell it when a load changes
        for rep in replicas:
            rep.on_load = picker.changed

    def submit(state: RequestState) -> None:
        replicas[picker.pick(replicas)].submit(state)

    env.process(clients.run(requests, submit))
    bar = _progress(total, recorder, str(policy)) if progress else None
    with _quiet_collector():
        try:
            while not done.triggered and requests:
                env.step()
        except simpy.core.EmptySchedule:  # a policy holds work it no longer schedules
            pass
    end_s = env.now
    for rep in replicas:  # report what never finished (async scheduling: or was never planned)
        for req in rep.state.running + rep.state.waiting + rep.deferred_requests():
            recorder.rejected(req, end_s, rep.idx)
    recorded = recorder.recorded_ids
    for r in requests:  # and what never arrived because the run stopped first
        if r.req_id not in recorded:
            recorder.rejected(RequestState(r.req_id, r.arrival_s, r.prompt_tokens, r.output_tokens),
                              end_s)
    if bar is not None:
        bar.close()
    recorder.on_record = None
    if stream_dir is not None:
        recorder.flush()
    stats = [astuple(rep.state.pool.stats()) for rep in replicas]
    return _Shard(recorder, [recorder.busy_s.get(rep.idx, 0.0) for rep in replicas], replica_ids, end_s,
                  replicas[0].policy.name, [sum(col) for col in zip(*stats, strict=True)])


@contextmanager
def _quiet_collector() -> Iterator[None]:
    """The cyclic garbage collector, out of the hot loop: everything built so far (the workload,
    replicas, cost tables) is frozen out of its sweeps, and its youngest generation is collected
    after 100,000 allocations instead of 700. A run allocates millions of short-lived objects
    that reference counting frees at once; each sweep otherwise walks every live request and
    replica again, a cost that grows with the fleet. Collection still runs, so cycles are freed
    (those frozen with the rest when the run ends and everything is unfrozen)."""
    thresholds = gc.get_threshold()
    gc.freeze()  # no full collection first: it cost more than a small run (0.04 s a call)
    gc.set_threshold(max(thresholds[0], 100_000), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _merge(shards: list[_Shard], too_long: list[Request], first_arrivals: list[Request],
           cost_model: CostModel,
           num_replicas: int, slo: dict[str, Any]) -> SimResult:
    rec = shards[0].recorder
    for other in shards[1:]:
        rec.absorb(other.recorder)
    for r in too_long:
        rec.rejected(RequestState(r.req_id, r.arrival_s, r.prompt_tokens, r.output_tokens), r.arrival_s)
    end_s = max(s.end_s for s in shards)
    start_s = min((r.arrival_s for r in first_arrivals), default=0.0)
    if rec.count_from_s is not None and math.isfinite(rec.count_from_s):  # after a warm-up
        start_s = rec.count_from_s
    idle_w = cost_model.idle_power_w()
    # idle power over the same window the metrics' duration covers: first arrival to last finish
    idle_energy = sum(max(0.0, end_s - start_s - b) for s in shards for b in s.busy_s) * idle_w
    req_df = rec.requests_frame()
    it_df = rec.iterations_frame().sort_values(["start_s", "replica"], kind="stable")
    it_df = it_df.reset_index(drop=True)
    metrics = summarize(req_df, rec, end_s=end_s, idle_energy_j=idle_energy, **slo)
    name = shards[0].policy_name
    metrics = {"policy": name, "replicas": num_replicas,
               "gpus": num_replicas * cost_model.parallel.num_gpus, **metrics}
    return SimResult(name, metrics, req_df, it_df, rec.request_gaps())  # after summarize


def _progress(total: int, recorder: Recorder, label: str) -> Any:
    from sim.progress import Progress

    bar = Progress(total, f"simulating {label}", "req")
    count = [0]

    def one() -> None:
        count[0] += 1
        bar.update(count[0])
    recorder.on_record = one
    return bar
