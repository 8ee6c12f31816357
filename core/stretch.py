"""Prefill stretches: runs of prefill iterations applied at once (the simulator's fast-forward;
the engine runs every iteration).

A built-in policy may say, with `prefill_ahead(state, plan)` (policies/base.py), which prompt
tiles follow a plan of every running decode plus prompt tiles: the iterations it would plan
next for certain while the running requests stay the same and nothing arrives (a chunked
prompt's chunks after the first, a layered batch's layer groups after the first; the plan may
start the prompts, the last iteration may emit their first tokens). Such a stretch of K
iterations is then known without asking the policy again: `stretch_steps` bounds K (a decode's
last token ends it, and so do the free blocks), the executor prices each iteration from its
totals (CostModel.price_with_decodes) and waits for their sum, and `apply_stretch` applies the
iterations done as K `apply`s of those plans would: the prompt tiles through `apply` itself,
the decodes' tokens in bulk through `apply_steady`. The decodes' KV blocks are taken at once:
the same blocks, free ones first and then cached ones in LRU order, that K steps would take,
only shared out between the requests in another order (each request's blocks hold the same
tokens; which block ids they are changes nothing observable), and no other request looks up
the prefix cache in between. A prompt the first plan starts has nothing cached (the simulator
checks), so its admission takes no blocks that the count would miss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.growth import most_that_fit
from core.request import RequestState
from core.state import ReplicaState
from costmodel.plan import Tile


def stretch_steps(state: ReplicaState, decodes: Sequence[RequestState],
                  steps: Sequence[Sequence[Tile]],
                  by_id: dict[int, RequestState] | None = None) -> int:
    """How many of the iterations `steps` (their prompt tiles; the decodes run in each) can run
    from now: none after a decode's last token, and the blocks all of them take free now.
    `by_id`: the requests the tiles name (default: the running ones)."""
    most = len(steps)
    if decodes:
        most = min(most, min(r.max_tokens - r.num_output_tokens for r in decodes))
    if most <= 1:  # one iteration is no stretch
        return most
    if by_id is None:
        by_id = {r.req_id: r for r in state.running}
    num_layers = state.num_layers

    def growth(k: int) -> int:
        """Blocks the first k iterations take at most: the decodes' KV for k tokens beside the
        prompts' blocks after the k-th iteration or before it (a layered batch's last group
        frees the hidden states it held while the decodes' k-th blocks are taken)."""
        return state.decode_growth(decodes, k) + max(prompt_blocks(k), prompt_blocks(k - 1))

    def prompt_blocks(k: int) -> int:
        """Blocks the prompts take in the first k iterations: each one's KV up to the tokens
        through its first layer (with hidden states while its layers are uneven)."""
        reach: dict[int, tuple[int, bool]] = {}
        for tiles in steps[:k]:
            for rid, _t0, t1, l0, l1, _c, _logits in tiles:
                top, partial = reach.get(rid, (by_id[rid].tokens_at(0), by_id[rid].is_partial))
                reach[rid] = (max(top, t1) if l0 == 0 else top,
                              l1 < num_layers if l0 == 0 else partial and l1 < num_layers)
        return sum(max(0, state.blocks_for(top, partial) - by_id[rid].num_blocks)
                   for rid, (top, partial) in reach.items())

    return most_that_fit(growth, most, state.num_free_blocks)  # growth rises with k


def apply_stretch(state: ReplicaState, decodes: Sequence[RequestState],
                  steps: Sequence[Sequence[Tile]], ends_s: Sequence[float]) -> list[RequestState]:
    """The iterations `steps` (their prompt tiles), the j-th ending at ends_s[j]: each decode
    emits a token at every end. Returns the requests that finished (at the last end), KV freed."""
    for tiles, end_s in zip(steps, ends_s, strict=True):
        state.apply(tiles, end_s)  # only the last emits tokens (first ones): no prompt finishes
    # the gaps between consecutive ends, as step-by-step time differences give them (what
    # np.diff computes, without its per-call overhead: this runs once per stretch)
    ends = np.asarray(ends_s, dtype=np.float64)
    gaps = (ends[1:] - ends[:-1]).tobytes()
    return state.apply_steady(len(steps), ends_s[0], gaps, ends_s[-1], decodes)
