"""Prefill-first (vLLM's scheduler before chunked prefill): whole prompts, decodes wait.

When prompts are waiting and fit, an iteration runs them whole (up to a token budget, at least
one prompt), through every layer, with no decodes: running requests stall for the iteration.
Otherwise the iteration decodes every running request. This is the baseline that shows what
stall-free scheduling buys.
"""

from __future__ import annotations

from costmodel.plan import Plan, Tile
from policies.base import decode_tiles, prompt_tile
from policies.state import ReplicaState


class PrefillFirst:
    stall_free = False
    steady_decode = True

    def __init__(self, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256) -> None:
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.name = "prefill-first"

    def schedule(self, state: ReplicaState) -> Plan:
        L = state.num_layers
        tiles: list[Tile] = []
        tokens = 0
        admission = state.admission()
        num_seqs = len(state.running)
        for req in state.waiting:
            P = req.num_prompt_tokens
            new = P - req.num_computed_tokens  # after its prefix-cache hit
            if tiles and tokens + new > self.max_num_batched_tokens:
                break
            if num_seqs >= self.max_num_seqs or not admission.try_admit(req, P):
                break
            tiles.append(prompt_tile(req, P, 0, L, L))
            tokens += new
            num_seqs += 1
        return tuple(tiles) if tiles else tuple(decode_tiles(state))
