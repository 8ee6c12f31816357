"""Adaptive layer grouping: size each iteration's prefill tile with the cost model.

Each iteration runs every decode plus one prefill tile per prompt of the batch in flight. The
tile starts at the prompt's frontier (its lowest unfinished layer l0, standing at t0 tokens)
and is chosen as large as the latency budget allows: first the whole token range through as
many layers as fit (binary search on the layer count; latency grows with it), and only when
not even one layer of the whole range fits, one layer with as many tokens as fit. Groups are
therefore uneven and chosen at run time.

The latency budget follows the queue: with nothing else waiting it is the predicted time of
the static layered plan's next group (the paper's G), capped at the TBT target; as prompts pile
up it grows linearly to the full target at `queue_saturation` waiting prompts, so a long queue
gets fewer, larger group passes while the TBT slack allows. Because the search includes the
static group's tile shape at every step, a plan the static G would have run within the target
is never replaced by one that misses it. If even the decodes alone miss the target, no plan can
meet it; the policy then falls back to the static group so prefills still progress. With no
decodes running, the target protects nobody: the prompts run through all their layers at once.
"""

from __future__ import annotations

from costmodel.plan import Plan, Tile
from policies.base import decode_tiles, no_prefill_ahead, prompt_tile
from policies.layered import LayeredPrefill, uncached_tokens
from policies.state import ReplicaState, RequestState


class AdaptiveLayered(LayeredPrefill):
    prefill_ahead = staticmethod(no_prefill_ahead)  # tiles sized by prices at run time

    def __init__(self, tbt_ms: float = 100.0, queue_saturation: int = 4,
                 chunk_tokens: int = 512, max_num_seqs: int = 256) -> None:
        super().__init__(max_groups=None, chunk_tokens=chunk_tokens, max_num_seqs=max_num_seqs)
        self.tbt_s = tbt_ms / 1e3
        self.queue_saturation = queue_saturation
        self.name = f"adaptive:{tbt_ms:g}"

    def _frontier(self, req: RequestState, L: int) -> tuple[int, int, int, int]:
        """(l0, t0, t_max, l_max): where the next tile starts and how far it may reach."""
        P = req.num_prompt_tokens
        l0 = req.layers_done_at(P, L)
        t0 = req.tokens_at(l0)
        t_max = P if l0 == 0 else req.tokens_at(l0 - 1)
        l_max = l0 + 1
        while l_max < L and req.tokens_at(l_max) == t0:
            l_max += 1
        return l0, t0, t_max, l_max

    def schedule(self, state: ReplicaState) -> Plan:
        cm = state.cost_model
        if cm is None:
            raise ValueError("adaptive needs the replica's cost model (state.cost_model)")
        L = state.num_layers
        decodes: list[Tile] = decode_tiles(state)
        batch = self.current_batch(state)
        if not batch:
            return tuple(decodes)
        total = sum(map(uncached_tokens, batch))
        # The static layered plan's next tiles: the reference the budget starts from.
        groups = self.groups_for(total, state)
        fronts = [self._frontier(r, L) for r in batch]

        def plan_for(span_layers: int, tokens: int | None = None) -> tuple[Tile, ...]:
            tiles = list(decodes)
            for r, (l0, t0, t_max, l_max) in zip(batch, fronts, strict=True):
                l1 = min(l_max, l0 + span_layers)
                t1 = t_max if tokens is None else min(t_max, t0 + tokens)
                tiles.append(prompt_tile(r, t1, l0, l1, L))
            return tuple(tiles)

        def latency(plan: tuple[Tile, ...]) -> float:
            return cm.price(plan).latency_s

        l0_ref = fronts[0][0]
        static_span = next((b - a for a, b in groups if a <= l0_ref < b), 1)
        max_span = max(l_max - l0 for l0, _, _, l_max in fronts)
        if not decodes:  # no token is waiting on this iteration: finish the prompts outright
            return plan_for(max_span)
        static_plan = plan_for(static_span)
        if latency(tuple(decodes)) > self.tbt_s:
            return static_plan  # no plan meets the target; keep prefills moving
        slack = min(1.0, len(state.waiting) / self.queue_saturation)
        budget = min(self.tbt_s, latency(static_plan) + slack * self.tbt_s)
        lo, hi = 0, max_span  # largest layer span whose plan fits the budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if latency(plan_for(mid)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo >= 1:
            return plan_for(lo)
        # Not one layer of the whole range fits: one layer, as many tokens as fit.
        t_lo, t_hi = 0, max(t_max - t0 for _, t0, t_max, _ in fronts)
        while t_lo < t_hi:
            mid = (t_lo + t_hi + 1) // 2
            if latency(plan_for(1, mid)) <= budget:
                t_lo = mid
            else:
                t_hi = mid - 1
        if t_lo >= 1:
            return plan_for(1, t_lo)
        return tuple(decodes)  # not one token fits beside the decodes: hold the prefill back
