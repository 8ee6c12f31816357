"""The engine's serving loop: the simulator's loop with wall-clock time and a real model.

    plan = policy.schedule(state); state.check(plan, policy.stall_free)
    out = engine.execute(plan)                 # timed, synchronised
    finished = state.apply(plan, now)          # the same apply the simulator uses

Requests arrive at their trace times on the wall clock (shifted so the first arrival is now):
between iterations every due arrival joins the waiting queue; with nothing to do the loop
sleeps until the next one. Before each schedule, decodes short of KV blocks preempt the newest
requests exactly as in the simulator. The replica's block budget is the simulator's
(sim.replica.kv_blocks on the same cost model), so a policy sees the same memory in both.

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

from core.metrics import summarize
from core.records import ITERATION_COLUMNS, Recorder, prefill_tokens_once
from costmodel.cost import HbmBytes, IterationCost
from costmodel.price import CostModel
from engine.energy import open_meter
from engine.executor import Engine
from policies.base import Policy, schedule_checked
from policies.registry import make_policy
from policies.state import ReplicaState, RequestState
from sim.cluster import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS, SimResult
from sim.replica import kv_blocks
from traces.request import Request

NAN = float("nan")


def iteration_row(counted: IterationCost, num_tiles: int, start_s: float, latency_s: float,
                  energy_j: float, hbm: HbmBytes) -> dict[str, float]:
    """One row of sim.records.ITERATION_COLUMNS for an executed plan, by column name: token
    counts and FLOPs from the cost model's count of the plan, time, energy and expert bytes
    measured."""
    return {"replica": 0, "start_s": start_s, "latency_s": latency_s, "iterations": 1,
            "prefill_tokens": prefill_tokens_once(counted), "decode_tokens": counted.decode_tokens,
            "num_tiles": num_tiles, "prefill_layer_tokens": counted.prefill_layer_tokens,
            "energy_j": energy_j, "flops": counted.flops, "expert_bytes": hbm.expert_weights,
            "hbm_bytes": hbm.total, "kv_read_bytes": hbm.kv_read}


def serve(engine: Engine, requests: Sequence[Request], policy: str | Policy, cost_model: CostModel,
          *, block_size: int = 16, gpu_memory_utilization: float = 0.9,
          activation_reserve_bytes: float | None = None, slo_ttft_ms: float = DEFAULT_SLO_TTFT_MS,
          slo_itl_ms: float = DEFAULT_SLO_ITL_MS, time_limit_s: float | None = None,
          on_iteration: Callable[[int, int], object] | None = None,
          token_log: list[tuple[int, int, int, float]] | None = None) -> SimResult:
    """Serve `requests` on `engine` under `policy`; tables and metrics as sim.simulate's.

    With `token_log`, every emitted token is appended as (req_id, index, token id, time_s)."""
    spec = engine.spec
    L = spec.num_layers
    pol = make_policy(policy) if isinstance(policy, str) else policy
    reserve = (0.05 * cost_model.hw.hbm_bytes if activation_reserve_bytes is None
               else activation_reserve_bytes)
    num_blocks, hidden_blocks = kv_blocks(cost_model, block_size, gpu_memory_utilization, reserve)
    state = ReplicaState(num_layers=L, num_total_blocks=num_blocks, block_size=block_size,
                         hidden_blocks_per_token=hidden_blocks, cost_model=cost_model)
    rec = Recorder(L)
    touched_rows: list[list[int]] = []
    bytes_per_expert = spec.expert_params * spec.expert_weight_bytes
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.req_id))
    n = len(ordered)
    meter = open_meter(engine.device.type, engine.device.index)
    idle_w = meter.idle_power_w() if meter is not None else NAN
    origin = ordered[0].arrival_s if ordered else 0.0
    t_start = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t_start + origin

    e_start = meter.energy_j() if meter is not None else NAN
    e_prev = e_start  # one counter read per iteration: its end is the next one's start
    it_energy = 0.0
    nxt = 0
    end_s = origin
    try:
        while True:
            now = clock()
            while nxt < n and ordered[nxt].arrival_s <= now:
                r = ordered[nxt]
                nxt += 1
                req = RequestState(r.req_id, r.arrival_s, r.prompt_tokens, r.output_tokens)
                if r.prompt_tokens + r.output_tokens > spec.max_context:
                    rec.rejected(req, now)
                    continue
                engine.add_request(r.req_id, r.prompt_tokens)
                state.waiting.append(req)
            if time_limit_s is not None and now - origin > time_limit_s:
                print(f"engine: {pol.name}: time limit {time_limit_s:g} s reached; "
                      "the rest is reported unfinished", file=sys.stderr)
                break
            if not state.running and not state.waiting:
                if nxt >= n:
                    break
                time.sleep(max(0.0, ordered[nxt].arrival_s - clock()))
                e_prev = meter.energy_j() if meter is not None else NAN  # idle is not the next iteration's
                continue
            state.now_s = now
            if state.decodes:
                for victim in state.preempt_for_decodes():
                    rec.preempted(victim)
                    engine.release(victim.req_id, keep_tokens=True)
            plan = schedule_checked(pol, state)  # the simulator's checks, every iteration
            if not plan:
                if state.running and not state.decodes:
                    # Part-way prompts filled the KV and none can grow: recompute the newest.
                    victim = state.preempt_newest()
                    rec.preempted(victim)
                    engine.release(victim.req_id, keep_tokens=True)
                    continue
                if nxt >= n:  # the policy holds work it will never schedule
                    break
                time.sleep(max(0.0, min(ordered[nxt].arrival_s - clock(), 0.01)))
                e_prev = meter.energy_j() if meter is not None else NAN
                continue
            counted = cost_model.price(plan)  # FLOPs and bytes of this plan: counts, not timing
            start = clock()
            out = engine.execute(plan)
            end_s = clock()
            energy = NAN
            if meter is not None:
                e_now = meter.energy_j()
                energy, e_prev = e_now - e_prev, e_now
                it_energy += energy
            finished = state.apply(plan, end_s)
            if token_log is not None:
                for rid, tok in out.tokens.items():
                    token_log.append((rid, len(engine.tokens[rid]) - 1, tok, end_s))
            expert_bytes = sum(out.experts_touched) * bytes_per_expert
            hbm = counted.hbm_bytes._replace(expert_weights=expert_bytes)
            row = iteration_row(counted, len(plan), start, end_s - start, energy, hbm)
            rec._it_row(*(row.get(c, NAN) for c in ITERATION_COLUMNS))
            touched_rows.append(out.experts_touched)
            for req in finished:
                engine.release(req.req_id)
                rec.finished(req, 0)
            if on_iteration is not None:
                on_iteration(rec.num_requests_recorded, n)
    finally:
        total_energy = meter.energy_j() - e_start if meter is not None else NAN
        if meter is not None:
            meter.close()
    for req in state.running + state.waiting:  # what never finished
        rec.rejected(req, end_s)
        engine.release(req.req_id)
    for r in ordered[nxt:]:
        rec.rejected(RequestState(r.req_id, r.arrival_s, r.prompt_tokens, r.output_tokens), end_s)
    req_df = rec.requests_frame()
    it_df = rec.iterations_frame()
    it_df["experts_touched"] = np.array([sum(t) for t in touched_rows], dtype=np.int64)
    it_df["experts_touched_per_layer"] = touched_rows
    # Energy between iterations is measured too: the run's counter delta minus the iterations'.
    idle_energy = total_energy - it_energy if meter is not None else NAN
    metrics = summarize(req_df, rec, end_s=end_s, idle_energy_j=idle_energy,
                        slo_ttft_ms=slo_ttft_ms, slo_itl_ms=slo_itl_ms)
    duration = end_s - origin
    extras = {"engine_device": str(engine.device), "engine_dtype": str(engine.dtype).replace("torch.", ""),
              "engine_attention": engine.attn_impl, "engine_experts": engine.expert_impl,
              "engine_idle_power_w": idle_w,
              "engine_dynamic_energy_j": total_energy - idle_w * duration if meter is not None else NAN,
              **roofline_summary(it_df)}
    metrics = {"policy": pol.name, "replicas": 1, "gpus": 1, **metrics,
               **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in extras.items()}}
    return SimResult(pol.name, metrics, req_df, it_df)


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
