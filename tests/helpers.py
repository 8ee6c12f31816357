"""Shared test helpers: drive a policy without SimPy, and a constant-latency cost model."""

from __future__ import annotations

from collections.abc import Callable

from costmodel import CostModel, HbmBytes, IterationCost, Tile, load_model
from policies.base import Policy
from policies.state import ReplicaState, RequestState


def drive(policy: Policy, prompts: list[tuple[int, int, int]], num_layers: int = 8,
          num_blocks: int = 100_000, on_plan: Callable[[ReplicaState, tuple[Tile, ...]], None] | None = None,
          max_iters: int = 100_000, cost_model: CostModel | None = None,
          ) -> tuple[ReplicaState, list[RequestState], int]:
    """Feed (arrival_iteration, prompt, output) requests at iteration boundaries; run to the end."""
    state = ReplicaState(num_layers=num_layers, num_total_blocks=num_blocks, hidden_blocks_per_token=0.05,
                         cost_model=cost_model)
    pending = sorted(prompts)
    reqs: list[RequestState] = []
    it = 0
    while (pending or state.waiting or state.running) and it < max_iters:
        while pending and pending[0][0] <= it:
            a, p, o = pending.pop(0)
            r = RequestState(len(reqs), float(a), p, o)
            reqs.append(r)
            state.waiting.append(r)
        state.preempt_for_decodes()
        plan = policy.schedule(state)
        state.check(plan, policy.stall_free)
        if on_plan:
            on_plan(state, plan)
        it += 1
        state.apply(plan, float(it))
    return state, reqs, it


class ConstantCost(CostModel):
    """Every iteration takes `latency_s`, whatever it holds: a queueing-theory server."""

    def __init__(self, latency_s: float) -> None:
        super().__init__(load_model("tiny-moe"), "cpu")
        self.latency_s = latency_s

    def price(self, plan):  # type: ignore[no-untyped-def,override]
        zero = HbmBytes(0.0, 0.0, 0.0, 0.0, 0.0)
        n = sum(t.t1 - t.t0 for t in plan)
        return IterationCost(self.latency_s, 0.0, 0.0, zero, 0.0, 1, 0, n, n, (None, (), (), 0, None))

    def price_decodes(self, num, kv_tokens, kv_tokens_window=0, latency_s=None):  # type: ignore[no-untyped-def,override]
        zero = HbmBytes(0.0, 0.0, 0.0, 0.0, 0.0)
        return IterationCost(self.latency_s, 0.0, 0.0, zero, 0.0, 1, num, 0, 0, (None, (), (), 0, None))

    def price_with_decodes(self, num, kv_tokens, kv_tokens_window, tiles):  # type: ignore[no-untyped-def,override]
        n = sum(t.t1 - t.t0 for t in tiles)
        return self.price(tiles)._replace(decode_tokens=num, prefill_tokens=n,
                                          prefill_layer_tokens=n)

    def decode_latencies_s(self, num, kv_tokens, kv_tokens_window):  # type: ignore[no-untyped-def,override]
        return None  # constant: the two ends give every step
