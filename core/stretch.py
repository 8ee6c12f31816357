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
the decodes' tokens in bulk through `apply_steady` (a layered batch's last group, which frees
its hidden states, after them: `apply_stretch`). The decodes' KV blocks are taken at once:
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
        by_id = state.running_by_id
    num_layers = state.num_layers
    # prompt_blocks[k]: blocks the prompts take in the first k iterations, each one's KV up to
    # the tokens through its first layer (with hidden states while its layers are uneven)
    prompt_blocks = [0]
    reach: dict[int, tuple[int, bool, int]] = {}  # req_id -> (tokens, partial, blocks taken)
    total = 0
    for tiles in steps[:most]:
        for rid, _t0, t1, l0, l1, _c, _logits in tiles:
            req = by_id[rid]
            top, partial, taken = reach.get(rid, (req.tokens_at(0), req.is_partial, 0))
            if l0 == 0:
                top, partial = max(top, t1), l1 < num_layers
            else:
                partial = partial and l1 < num_layers
            now = max(0, state.blocks_for(top, partial) - req.num_blocks)
            total += now - taken
            reach[rid] = (top, partial, now)
        prompt_blocks.append(total)

    def growth(k: int) -> int:
        """Blocks the first k iterations take at most: the decodes' KV for k tokens beside the
        prompts' blocks after the k-th iteration or before it (a layered batch's last group
        frees the hidden states it held while the decodes' k-th blocks are taken)."""
        return state.decode_growth(decodes, k) + max(prompt_blocks[k], prompt_blocks[k - 1])

    free = state.num_free_blocks
    # a decode takes at most ceil(k / block_size) blocks in k steps: most fits if that does
    if (len(decodes) * -(-most // state.block_size)
            + max(prompt_blocks[most], prompt_blocks[most - 1]) <= free):
        return most
    return most_that_fit(growth, most, free)  # growth rises with k


def apply_stretch(state: ReplicaState, decodes: Sequence[RequestState],
                  steps: Sequence[Sequence[Tile]], ends_s: Sequence[float]) -> list[RequestState]:
    """The iterations `steps` (their prompt tiles), the j-th ending at ends_s[j]: each decode
    emits a token at every end. Returns the requests that finished (at the last end), KV freed.

    A step applies the decodes' tiles before the prompts', and frees what finished after
    both. Blocks are only taken until the last iteration, whose prompt tiles may instead free
    some: a layered batch's last group (a tile from a layer above 0) frees its hidden states
    after the decodes took their last blocks (evicting cached ones where none is free), so
    that iteration's prompt tiles go after the decodes' tokens; a chunk takes blocks before
    the finished decodes free theirs, so it goes before them."""
    frees = any(t[3] for t in steps[-1])
    if len(steps) > 2 and _one_prompt_through_the_stack(steps[1:], state.num_layers):
        # a chunked prompt's chunks after the first (which may admit it), as one tile: apply
        # does what it does for each in turn, the blocks taken at once (nothing else takes
        # any in between), the token, if any, at the last end
        first, last = steps[1][0], steps[-1][0]
        state.apply(steps[0], ends_s[0])
        if _offers_uncached(state, first[0], last[2]):
            state.apply((Tile(first[0], first[1], last[2], 0, last[4], first[5], last[6]),),
                        ends_s[-1])
        else:  # a block it fills holds content cached elsewhere: each chunk in turn (below)
            for tiles, end_s in zip(steps[1:], ends_s[1:], strict=True):
                state.apply(tiles, end_s)
    else:
        for tiles, end_s in zip(steps[:-1] if frees else steps, ends_s, strict=False):
            state.apply(tiles, end_s)  # only the last emits tokens (first ones): none finishes
    # the gaps between consecutive ends, as step-by-step time differences give them (what
    # np.diff computes, without its per-call overhead: this runs once per stretch)
    ends = np.asarray(ends_s, dtype=np.float64)
    gaps = (ends[1:] - ends[:-1]).tobytes()
    finished = state.apply_steady(len(steps), ends_s[0], gaps, ends_s[-1], decodes)
    if frees:
        state.apply(steps[-1], ends_s[-1])  # first tokens, none a request's last
    return finished


def _offers_uncached(state: ReplicaState, req_id: int, t1: int) -> bool:
    """Whether none of the blocks the request fills up to token t1 holds content the prefix
    cache already has. Where one does, a step's offer finds it cached (the block stays
    uncached) and a later chunk's blocks may then evict that cached copy, where one merged tile
    takes every block (evicting) before offering any: the cache would differ."""
    pool = state.pool
    if not pool.enable_prefix_caching or not pool.ever_cached:
        return True
    table = next(r for r in state.running if r.req_id == req_id).block_table
    hashes = table.block_hashes
    cached_block = pool.cached_block
    return all(cached_block(h) is None
               for h in hashes[table.num_hashed:min(t1 // state.block_size, len(hashes))])


def _one_prompt_through_the_stack(steps: Sequence[Sequence[Tile]], num_layers: int) -> bool:
    """Every step is one whole-stack tile of the same request, each going on where the last
    stopped, only the last with logits."""
    if len(steps[0]) != 1:
        return False
    rid, t1 = steps[0][0][0], steps[0][0][1]
    for j, tiles in enumerate(steps):
        if len(tiles) != 1:
            return False
        r, t0, end, l0, l1, _c, logits = tiles[0]
        if r != rid or t0 != t1 or l0 or l1 != num_layers or (logits and j < len(steps) - 1):
            return False
        t1 = end
    return True
