"""A serving cluster: N data-parallel replicas behind a router, fed by a request trace.

`simulate` builds the SimPy environment, one arrival process that routes each request at its
arrival time, and one process per replica (sim/replica.py), runs to the last completion and
returns the per-request and per-iteration tables with the summary metrics.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import simpy

from costmodel.errors import ConfigError
from costmodel.price import CostModel
from policies.base import Policy
from policies.registry import make_policy
from policies.state import RequestState
from sim.metrics import summarize
from sim.records import Recorder
from sim.replica import Replica, kv_blocks
from sim.router import make_router
from traces.request import Request

DEFAULT_SLO_TTFT_MS = 2000.0
DEFAULT_SLO_ITL_MS = 100.0


@dataclass(frozen=True)
class SimResult:
    policy: str
    metrics: dict[str, Any]
    requests: pd.DataFrame = field(repr=False)
    iterations: pd.DataFrame = field(repr=False)

    def write(self, out_dir: str | Path) -> Path:
        """Write requests/iterations parquet and metrics JSON under out_dir/<policy>/, atomically."""
        d = Path(out_dir) / self.policy.replace(":", "_").replace("/", "_")
        d.mkdir(parents=True, exist_ok=True)
        _atomic(d / "requests.parquet", lambda p: self.requests.to_parquet(p, index=False))
        _atomic(d / "iterations.parquet", lambda p: self.iterations.to_parquet(p, index=False))
        _atomic(d / "metrics.json",
                lambda p: p.write_text(json.dumps(self.metrics, indent=2, sort_keys=True) + "\n"))
        return d


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _mark_builtin(policy: Policy, spec: object) -> Policy:
    if isinstance(spec, str) and ":" in spec and ("/" in spec or ".py" in spec):
        return policy
    if type(policy).__module__.startswith("policies."):
        policy._layersim_builtin = True  # type: ignore[attr-defined]
    return policy


def simulate(requests: Sequence[Request], cost_model: CostModel,
             policy: str | Callable[[], Policy], *, num_replicas: int = 1,
             router: str = "round-robin", seed: int = 0, block_size: int = 16,
             gpu_memory_utilization: float = 0.9, activation_reserve_bytes: float | None = None,
             slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS, slo_itl_ms: float = DEFAULT_SLO_ITL_MS,
             check: bool = False, fast_forward: bool = True, stream_dir: Path | None = None,
             progress: bool = False) -> SimResult:
    if num_replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {num_replicas}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError("gpu_memory_utilization must be in (0, 1]")

    def new_policy() -> Policy:
        return _mark_builtin(make_policy(policy) if isinstance(policy, str) else policy(), policy)

    reserve = (0.05 * cost_model.hw.hbm_bytes if activation_reserve_bytes is None
               else activation_reserve_bytes)
    num_blocks, hidden_blocks = kv_blocks(cost_model, block_size, gpu_memory_utilization, reserve)
    if num_blocks <= 0:
        raise ConfigError(f"no memory left for the KV cache: {cost_model.model.name} on "
                          f"{cost_model.parallel.num_gpus} x {cost_model.hw.name}")
    env = simpy.Environment()
    recorder = Recorder(cost_model.model.num_layers, stream_dir)
    replicas = [Replica(env, i, new_policy(), cost_model, num_blocks, block_size, hidden_blocks,
                        recorder, check=check, fast_forward=fast_forward)
                for i in range(num_replicas)]
    picker = make_router(router, seed)
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.req_id))
    max_context = cost_model.model.max_context

    def arrivals():  # type: ignore[no-untyped-def]
        for r in ordered:
            if r.arrival_s > env.now:
                yield env.timeout(r.arrival_s - env.now)
            state = RequestState(r.req_id, r.arrival_s, r.prompt_tokens, r.output_tokens)
            if r.prompt_tokens + r.output_tokens > max_context:
                recorder.rejected(state, env.now)
                continue
            replicas[picker.pick(replicas)].submit(state)

    feeder = env.process(arrivals())
    bar = _progress(len(ordered), recorder) if progress else None
    env.run(until=feeder)
    try:
        while any(r.state.running or r.state.waiting for r in replicas):
            env.step()
    except simpy.core.EmptySchedule:  # a policy stopped scheduling work it still holds
        pass
    end_s = env.now
    for rep in replicas:  # report what never finished
        for req in rep.state.running + rep.state.waiting:
            recorder.rejected(req, end_s, rep.idx)
    if bar is not None:
        bar.close()
    if stream_dir is not None:
        recorder.flush()
    idle_w = cost_model.idle_power_w()
    idle_energy = sum(max(0.0, end_s - rep.busy_s) for rep in replicas) * idle_w
    req_df = recorder.requests_frame()
    it_df = recorder.iterations_frame()
    metrics = summarize(req_df, recorder, end_s=end_s, idle_energy_j=idle_energy,
                        slo_ttft_ms=slo_ttft_ms, slo_itl_ms=slo_itl_ms)
    metrics = {"policy": replicas[0].policy.name, "replicas": num_replicas,
               "gpus": num_replicas * cost_model.parallel.num_gpus, **metrics}
    return SimResult(replicas[0].policy.name, metrics, req_df, it_df)


def _progress(total: int, recorder: Recorder) -> Any:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="req", desc="simulating", file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty(), mininterval=0.5)
    recorder.on_record = lambda: bar.update(1)
    return bar
