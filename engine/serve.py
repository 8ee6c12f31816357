"""The engine's serving loop: core/step.py's serving step with a wall clock and a real model.

    step = prepare(state, policy, now, checked=True, ...)   # preemptions, the checked plan
    tables = reserve(state, step.plan)                      # the plan's KV blocks, taken now
    out = engine.execute(step.plan, block_tables=tables)    # timed, synchronised
    commit(state, step.plan, end)                           # the simulator's commit

Requests arrive at their trace times on the wall clock (shifted so the first arrival is now):
between iterations every due arrival joins the waiting queue; with nothing to do the loop
sleeps until the next one, and while the policy declines what it holds it looks again every
10 ms. Requests the replica can never serve are rejected up front by the simulator's rule
(core/admission.py), and the replica's block budget is the simulator's (kv_blocks on the same
cost model), so a policy sees the same memory, preemptions and rejections in both - capped by
the engine's own KV memory where that is smaller (then the policy sees what the engine holds).

The engine's paged KV cache is the replica state's block pool: the engine lays its cache out in
pages of `block_size` tokens (Engine.use_block_size; FlashAttention's paged kernels need a
multiple of 256, so another size runs SDPA), `core.step.reserve` allocates the plan's blocks
before it runs and the engine writes and reads K/V in exactly those blocks (a request's page
table is its block table); commit then finds them allocated. Prefix caching (on unless
`enable_prefix_caching` is False): a request's block hashes chain its prompt's token ids
(core.blocks.token_block_hashes), so a prompt sharing full blocks with one served earlier
starts after them and attends to the K/V the earlier request wrote there. Hashed are the
prompts whose content is known: given token ids (`prompt_token_ids`), and a trace's `hash_ids`
(each trace block's tokens drawn from its hash id, so shared ids are shared tokens; hashes
only over the blocks the simulator's trace hashes cover). A prompt the engine draws at random
for a length-only request is no known content and is not hashed, as in the simulator (whose
synthetic requests never hit), so both executors make the same plans. A preempted
request's blocks are freed by the core, the engine drops its hidden states and keeps its token
ids for the recompute.

Each iteration row records the measured latency, NVML energy (GPU only), the experts the
router touched per layer and their bytes (distinct experts x bytes of one expert at the
model's declared dtype, the unit the cost model counts in); FLOPs and the other HBM bytes are
the cost model's counts for the executed plan (for the roofline summary), not measurements.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from core.admission import kv_blocks, screen
from core.blocks import BlockHash, token_block_hashes
from core.metrics import prefix_cache_metrics, summarize
from core.records import Recorder, prefill_tokens_once
from core.request import RequestState, request_state
from core.result import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS, SimResult
from core.state import ReplicaState
from core.step import RUN, Committed, commit, prepare, reserve
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
          token_log: list[tuple[int, int, int, float]] | None = None,
          enable_prefix_caching: bool = True,
          prompt_token_ids: Mapping[int, Sequence[int]] | None = None,
          return_logits: dict[int, list[torch.Tensor]] | None = None) -> SimResult:
    """Serve `requests` on `engine` under `policy`; tables and metrics as sim.simulate's.

    With `token_log`, every emitted token is appended as (req_id, position, token id, time_s),
    in the order the serving step emits them; with `return_logits`, each emitted token's
    logits ([V] fp32) are appended to the request's list. `prompt_token_ids` gives requests
    their prompts (req_id -> ids); the others get random ones (Engine.add_request)."""
    L = engine.spec.num_layers
    pol = make_policy(policy) if isinstance(policy, str) else policy
    num_blocks, hidden_blocks = kv_blocks(cost_model, block_size, gpu_memory_utilization,
                                          activation_reserve_bytes)
    num_blocks = min(num_blocks, engine.use_block_size(block_size))
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.req_id))
    screening = screen(ordered, cost_model, num_blocks, block_size, hidden_blocks)
    state = ReplicaState(num_layers=L, num_total_blocks=num_blocks, block_size=block_size,
                         hidden_blocks_per_token=hidden_blocks, cost_model=cost_model,
                         enable_prefix_caching=enable_prefix_caching)
    given = prompt_token_ids or {}
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
                state.waiting.append(_arrive(engine, r, given.get(r.req_id), block_size))
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
            tables = reserve(state, plan)
            out = engine.execute(plan, return_logits is not None,
                                 {rid: t.block_ids for rid, t in tables.items()})
            end_s = arrivals.clock()
            energy = meter.iteration()
            done = commit(state, plan, end_s)
            _emitted_tokens(engine, out, done, end_s, token_log)
            if return_logits is not None and out.logits:
                for req in done.emitted:
                    return_logits.setdefault(req.req_id, []).append(out.logits[req.req_id])
            expert_bytes = sum(out.experts_touched) * bytes_per_expert
            # a prompt's last token run alone is priced as a decode: book it as prefill
            rec.iteration_row(**rec.rebooked(measured_row(counted, len(plan), start, end_s - start,
                                                          energy, expert_bytes),
                                             state.prompt_tokens_as_decodes))
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
    res = _result(engine, pol.name, rec, touched_rows, meter, arrivals.origin, end_s,
                  slo_ttft_ms, slo_itl_ms, cost_model, screening.counts(), screening.texts())
    res.metrics.update(prefix_cache_metrics(state.pool.stats(), enable_prefix_caching))
    return res


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


def _request_state(r: Request, block_hashes: Sequence[BlockHash] = ()) -> RequestState:
    return RequestState(r.req_id, r.arrival_s, r.prompt_tokens, r.output_tokens, block_hashes)


def _arrive(engine: Engine, r: Request, token_ids: Sequence[int] | None,
            block_size: int) -> RequestState:
    """Register an arriving request's prompt with the engine; its state in the replica, with
    block hashes of its prompt's token ids where its content is known (see the module note)."""
    if token_ids is None and r.hash_ids:
        token_ids = trace_prompt(engine, r)
    ids = engine.add_request(r.req_id, r.prompt_tokens, token_ids)
    if token_ids is not None:
        hashes = token_block_hashes(ids, block_size)
        if r.hash_ids:  # only the blocks the simulator knows (those its trace ids cover)
            hashes = hashes[:len(request_state(r, block_size).block_table.block_hashes)]
    else:  # content the engine invented: unknown, as to the simulator
        hashes = []
    return _request_state(r, hashes)


def trace_prompt(engine: Engine, r: Request) -> list[int]:
    """Token ids for a trace request whose `hash_ids` name its content block by block: each
    trace block's tokens drawn from (engine seed, hash id), so requests sharing hash ids share
    those tokens; tokens past the ids from (seed, req_id)."""
    vocab, n, bs = engine.spec.vocab, r.prompt_tokens, r.hash_block_size
    ids: list[int] = []
    for h in r.hash_ids:
        if len(ids) >= n:
            break
        gen = torch.Generator().manual_seed((engine.seed * 1_000_003 + int(h)) % (1 << 63))
        ids += torch.randint(0, vocab, (min(bs, n - len(ids)),), generator=gen).tolist()
    if len(ids) < n:
        gen = torch.Generator().manual_seed(engine.seed * 1_000_003 + r.req_id + 1)
        ids += torch.randint(0, vocab, (n - len(ids),), generator=gen).tolist()
    return ids


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
