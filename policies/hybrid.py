"""Hybrid prefill: layered group passes, themselves chunked along tokens when too big.

Layered prefill bounds each iteration's prefill work to about one chunk (`budget` tokens
through every layer, i.e. budget * L token-layers) only while G = ceil(P / budget) <= L. Longer
prompts (P > budget * L) would push a whole group of P tokens through in one iteration and blow
the iteration time. Hybrid keeps the layered grouping but cuts such a group pass into token
chunks of budget * L / (layers in group) tokens, so every iteration stays within the same
token-layer budget. Tiles cut both axes; every (token, layer) cell is computed exactly once.

Prompt batches start as in layered prefill; the group structure comes from the batch's total
tokens; a part-way prompt resumes at its lowest unfinished layer, group by group.
"""

from __future__ import annotations

from costmodel.plan import Tile
from policies.base import no_prefill_ahead, prompt_tile
from policies.layered import LayeredPrefill, uncached_tokens
from policies.state import ReplicaState, RequestState


class HybridPrefill(LayeredPrefill):
    def __init__(self, budget: int = 512, max_num_seqs: int = 256) -> None:
        super().__init__(max_groups=None, chunk_tokens=budget, max_num_seqs=max_num_seqs)
        self.name = f"hybrid:{budget}"

    prefill_ahead = staticmethod(no_prefill_ahead)  # token-chunked groups: asked each time

    def _tile(self, req: RequestState, groups: list[tuple[int, int]], L: int) -> Tile:
        # The lowest layer that has not seen the whole prompt, and the group it belongs to.
        P = req.num_prompt_tokens
        low = req.layers_done_at(P, L)
        l0, l1 = next((a, b) for a, b in groups if a <= low < b)
        t0 = req.tokens_at(l0)
        chunk = max(1, self.chunk_tokens * L // (l1 - l0))
        return prompt_tile(req, min(P, t0 + chunk), l0, l1, L)

    def prefill_tiles(self, batch: list[RequestState], state: ReplicaState) -> list[Tile]:
        """Each prompt's next tile, while its KV blocks fit: a running prompt's chunk through
        the first group takes blocks as it goes (layered prefill takes a prompt's all at once,
        when new_batch admits it), so it may have to wait for them; later groups take none."""
        groups = self.groups_for(sum(map(uncached_tokens, batch)), state)
        L = state.num_layers
        admission = None
        tiles = []
        for r in batch:
            t = self._tile(r, groups, L)
            if t.l0 == 0 and r.num_cached_tokens >= 0:  # admitted earlier: growing now
                admission = admission or state.admission()
                if not admission.try_admit(r, t.t1, partial=t.l1 < L):
                    break  # FCFS: a later prompt does not pass one that waits for blocks
            tiles.append(t)
        return tiles
