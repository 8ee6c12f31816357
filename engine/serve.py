"""The engine's serving loop: core/step.py's serving step with a wall clock and a real model.

    step = prepare(state, policy, now, checked=True, ...)   # preemptions, the checked plan
    out = engine.execute(step.plan)                         # timed, synchronised
    commit(state, step.plan, end)                           # the simulator's commit

Requests arrive at their trace times on the wall clock (shifted so the first arrival is now):
between iterations every due arrival joins the waiting queue; with nothing to do the loop
sleeps until the next one, and while the policy declines what it holds it looks again every
10 ms. Requests the replica can never serve are rejected up front by the simulator's rule
(core/admission.py), and the replica's block budget is the simulator's (kv_blocks on the same
cost model), so a policy sees the same memory, preemptions and rejections in both. A preempted
request's pages are freed and its token ids kept for the recompute.

Each iteration row records the measured latency, NVML energy (GPU only), the experts the
router touched per layer and their bytes (distinct experts x bytes of one expert at the
model's declared dtype, the unit the cost model counts in); FLOPs and the other HBM bytes are
the cost model's counts for the executed plan (for the roofline summary), not measurements.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from core.admission import kv_blocks, screen
from core.metrics import summarize
from core.records import Recorder, prefill_tokens_once
from core.request import RequestState
from core.result import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS, SimResult
from core.state import ReplicaState
from core.step import RUN, Committed, commit, prepare
from costmodel.cost import IterationCost
from costmodel.price import CostModel
from engine.energy import open_meter
from engine.executor import Engine, EngineError, StepOutput
from policies.base import Policy
from policies.registry import make_policy
from traces.request import Request

NAN = float("nan")
DECLINED_POLL_S = 0.01  # how often a policy that declines the work it holds is asked again


def serve(engine: Engine, requests: Sequence[Request], policy: str | Policy, cost_model: CostModel,
          *, block_size: int = 16, gpu_memory_utilization: float = 0.9,
          activation_reserve_bytes: float | None = None, slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS,
          slo_itl_ms: float = DEFAULT_SLO_ITL_MS, time_limit_s: float | None = None,
          on_iteration: Callable[[int, int], object] | None = None,
          token_log: list[tuple[int, int, int, float]] | None = None) -> SimResult:
    """Serve `requests` on `engine` under `policy`; tables and metrics as sim.simulate's.

    With `token_log`, every emitted token is appended as (req_id, position, token id, time_s),
    in the order the serving step emits them."""
    L = engine.spec.num_layers
    pol = make_policy(policy) if isinstance(policy, str) else policy
    num_blocks, hidden_blocks = kv_blocks(cost_model, block_size, gpu_memory_utilization,
                                          activation_reserve_bytes)
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.req_id))
    screening = screen(ordered, cost_model, num_blocks, block_size, hidden_blocks)
    state = ReplicaState(num_layers=L, num_total_blocks=num_blocks, block_size=block_size,
                         hidden_blocks_per_token=hidden_blocks, cost_model=cost_model)
    rec = Recorder(L)
    for r in screening.rejected:
        rec.rejected(_request_state(r), r.arrival_s)
    touched_rows: list[list[int]] = []
    bytes_per_expert = engine.spec.expert_params * engine.spec.expert_weight_bytes
    meter = _Energy(engine)
    arrivals = _Arrivals(screening.servable)
    end_s = arrivals.origin

    def preempted(victim: RequestState) -> None:
        rec.preempted(victim)
        engine.release(victim.req_id, keep_tokens=True)  # its recompute reuses the token ids

    try:
        while True:
            now = arrivals.clock()
            for r in arrivals.due(now):
                engine.add_request(r.req_id, r.prompt_tokens)
                state.waiting.append(_request_state(r))
            if time_limit_s is not None and now - arrivals.origin > time_limit_s:
                print(f"engine: {pol.name}: time limit {time_limit_s:g} s reached; "
                      "the rest is reported unfinished", file=sys.stderr)
                break
            holds_work = bool(state.running or state.waiting)
            step = prepare(state, pol, now, checked=True, on_preempt=preempted) if holds_work else None
            if step is None or step.action is not RUN:
                if arrivals.done:  # nothing left to serve, or the policy holds work it never runs
                    break
                arrivals.sleep(None if step is None else DECLINED_POLL_S)
                meter.skip()  # the wait is not the next iteration's energy
                continue
            plan = step.plan
            counted = cost_model.price(plan)  # FLOPs and bytes of this plan: counts, not timing
            start = arrivals.clock()
            out = engine.execute(plan)
            end_s = arrivals.clock()
            energy = meter.iteration()
            done = commit(state, plan, end_s)
            _emitted_tokens(engine, out, done, end_s, token_log)
            expert_bytes = sum(out.experts_touched) * bytes_per_expert
            rec.iteration_row(**measured_row(counted, len(plan), start, end_s - start, energy,
                                             expert_bytes))
            touched_rows.append(out.experts_touched)
            for req in done.finished:
                engine.release(req.req_id)
                rec.finished(req, 0)
            if on_iteration is not None:
                on_iteration(rec.num_requests_recorded, len(ordered))
    finally:
        meter.close()
    for req in state.running + state.waiting:  # what never finished
        rec.rejected(req, end_s)
        engine.release(req.req_id)
    for r in arrivals.left():  # and what never arrived before the time limit
        rec.rejected(_request_state(r), end_s)
    return _result(engine, pol.name, rec, touched_rows, meter, arrivals.origin, end_s,
                   slo_ttft_ms, slo_itl_ms, cost_model, screening.counts(), screening.texts())


def measured_row(counted: IterationCost, num_tiles: int, start_s: float, latency_s: float,
                 energy_j: float, expert_bytes: float) -> dict[str, Any]:
    """Recorder.iteration_row's arguments for an executed plan: token counts and FLOPs from the
    cost model's count of the plan, time, energy and expert bytes measured."""
    hbm = counted.hbm_bytes._replace(expert_weights=expert_bytes)
    return {"replica": 0, "start_s": start_s, "latency_s": latency_s, "iterations": 1,
            "prefill_tokens": prefill_tokens_once(counted), "decode_tokens": counted.decode_tokens,
            "num_tiles": num_tiles, "prefill_layer_tokens": counted.prefill_layer_tokens,
            "energy_j": energy_j, "flops": counted.flops, "expert_bytes": hbm.expert_weights,
            "hbm_bytes": hbm.total, "kv_read_bytes": hbm.kv_read}


def roofline_summary(it: Any) -> dict[str, float]:
    """Achieved rates of the executed iterations: decode-only ones against the bytes they must
    move (weights touched, KV read and written, activations), prefill-carrying ones against
    their FLOPs."""
    dec = it[it["prefill_layer_tokens"] == 0]
    pre = it[it["prefill_layer_tokens"] > 0]
    dec_t, pre_t = float(dec["latency_s"].sum()), float(pre["latency_s"].sum())
    return {"engine_decode_iterations": int(len(dec)),
            "engine_decode_achieved_gbps": float(dec["hbm_bytes"].sum()) / dec_t / 1e9 if dec_t else NAN,
            "engine_prefill_iterations": int(len(pre)),
            "engine_prefill_achieved_tflops": float(pre["flops"].sum()) / pre_t / 1e12 if pre_t else NAN}


def _request_state(r: Request) -> RequestState:
    return RequestState(r.req_id, r.arrival_s, r.prompt_tokens, r.output_tokens)


def _emitted_tokens(engine: Engine, out: StepOutput, done: Committed, end_s: float,
                    token_log: list[tuple[int, int, int, float]] | None) -> None:
    """The model sampled a token for exactly the requests the serving step emitted one for
    (else engine and state disagree: an internal error); log them in the step's order."""
    if len(out.tokens) != len(done.emitted) or any(r.req_id not in out.tokens for r in done.emitted):
        raise EngineError(f"internal: the model sampled tokens for requests {sorted(out.tokens)}, "
                          f"the serving step emitted for {sorted(r.req_id for r in done.emitted)}")
    if token_log is not None:
        for req in done.emitted:
            rid = req.req_id
            token_log.append((rid, len(engine.tokens[rid]) - 1, out.tokens[rid], end_s))


class _Arrivals:
    """The servable requests in arrival order, on a wall clock that starts at the first arrival."""

    def __init__(self, ordered: list[Request]) -> None:
        self.ordered = ordered
        self.next = 0
        self.origin = ordered[0].arrival_s if ordered else 0.0
        self._t0 = time.perf_counter()

    def clock(self) -> float:
        return time.perf_counter() - self._t0 + self.origin

    @property
    def done(self) -> bool:
        return self.next >= len(self.ordered)

    def due(self, now: float) -> list[Request]:
        first = self.next
        while self.next < len(self.ordered) and self.ordered[self.next].arrival_s <= now:
            self.next += 1
        return self.ordered[first:self.next]

    def sleep(self, at_most_s: float | None) -> None:
        """Until the next arrival (at most `at_most_s`, when given)."""
        wait = self.ordered[self.next].arrival_s - self.clock()
        time.sleep(max(0.0, wait if at_most_s is None else min(wait, at_most_s)))

    def left(self) -> list[Request]:
        return self.ordered[self.next:]


class _Energy:
    """NVML energy (GPU only; NaN elsewhere): each iteration gets the counter's difference since
    the previous read, one read per iteration, re-read after waits; the run's total less the
    iterations' is the energy between them."""

    def __init__(self, engine: Engine) -> None:
        self.meter = open_meter(engine.device.type, engine.device.index)
        self.idle_w = self.meter.idle_power_w() if self.meter is not None else NAN
        self.start = self.prev = self.meter.energy_j() if self.meter is not None else NAN
        self.in_iterations = 0.0
        self.total = NAN

    def iteration(self) -> float:
        if self.meter is None:
            return NAN
        now = self.meter.energy_j()
        energy, self.prev = now - self.prev, now
        self.in_iterations += energy
        return energy

    def skip(self) -> None:
        if self.meter is not None:
            self.prev = self.meter.energy_j()

    def close(self) -> None:
        if self.meter is not None:
            self.total = self.meter.energy_j() - self.start
            self.meter.close()


def _result(engine: Engine, policy_name: str, rec: Recorder, touched_rows: list[list[int]],
            meter: _Energy, origin: float, end_s: float, slo_ttft_ms: float, slo_itl_ms: float,
            cost_model: CostModel, rejected: dict[str, int], rejections: dict[int, str]
            ) -> SimResult:
    """The tables and metrics of a served run, as the simulator reports them, plus the
    engine's own: device, kernels, idle power, dynamic energy, the roofline summary."""
    req_df = rec.requests_frame()
    it_df = rec.iterations_frame()
    it_df["experts_touched"] = np.array([sum(t) for t in touched_rows], dtype=np.int64)
    it_df["experts_touched_per_layer"] = touched_rows
    measured = meter.meter is not None
    metrics = summarize(req_df, rec, end_s=end_s,
                        idle_energy_j=meter.total - meter.in_iterations if measured else NAN,
                        slo_ttft_ms=slo_ttft_ms, slo_itl_ms=slo_itl_ms)
    extras = {"engine_device": str(engine.device), "engine_dtype": str(engine.dtype).replace("torch.", ""),
              "engine_attention": engine.attn_impl, "engine_experts": engine.expert_impl,
              "engine_idle_power_w": meter.idle_w,
              "engine_dynamic_energy_j": (meter.total - meter.idle_w * (end_s - origin) if measured
                                          else NAN),
              **roofline_summary(it_df)}
    metrics = {"policy": policy_name, "replicas": 1, "gpus": 1, **metrics,
               **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in extras.items()},
               "max_context": cost_model.model.max_context, **rejected}
    return SimResult(policy_name, metrics, req_df, it_df, rec.request_gaps(), rejections)
