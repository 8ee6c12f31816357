"""Prefill stretches: runs of chunked-prefill iterations applied at once (the simulator's
fast-forward; the engine runs every iteration).

A policy that promises `steady_chunks` (policies/base.py) continues a plan of every running
decode plus one whole-stack chunk of a part-way prompt, short of the prompt's end, with the same
plan advanced: each decode one token, the prompt by a chunk of the same size, for as long as the
running requests stay the same and the KV blocks suffice. Such a stretch of K iterations is then
known without asking the policy again: `chunk_stretch_steps` bounds K (the prompt's last chunk,
which emits its first token and may admit waiting prompts, is left to the policy; so is every
step after the first decode to finish, and any step the free blocks could not hold), the
executor prices each iteration from its totals (CostModel.price_chunk) and waits for their sum,
and `apply_chunk_stretch` applies the iterations done as K `apply`s of those plans would. Its
KV blocks are taken at once: the same blocks, free ones first and then cached ones in LRU order,
that K steps would take, only shared out between the requests in another order (each request's
blocks hold the same tokens; which block ids they are changes nothing observable), and no other
request can look up the prefix cache in between (nothing is admitted inside a stretch).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from core.request import RequestState
from core.state import ReplicaState


def chunk_stretch_steps(state: ReplicaState, decodes: Sequence[RequestState],
                        prompt: RequestState, chunk_tokens: int) -> int:
    """How many iterations of the stretch starting now (this one included) are known: chunks
    that stop short of the prompt's end, no decode past its last token, and the blocks all of
    them take free now."""
    c = prompt.num_computed_tokens
    most = (prompt.num_prompt_tokens - 1 - c) // chunk_tokens
    if decodes:
        most = min(most, min(r.max_tokens - r.num_output_tokens for r in decodes))
    if most <= 0:
        return 0

    def growth(steps: int) -> int:
        return (state.decode_growth(decodes, steps)
                + max(0, state.blocks_for(c + steps * chunk_tokens) - prompt.num_blocks))

    free = state.num_free_blocks
    if growth(most) <= free:
        return most
    lo, hi = 0, most  # growth only rises with the steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if growth(mid) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo


def apply_chunk_stretch(state: ReplicaState, decodes: Sequence[RequestState],
                        prompt: RequestState, chunk_tokens: int,
                        ends_s: Sequence[float]) -> list[RequestState]:
    """The stretch's first len(ends_s) iterations, the j-th ending at ends_s[j]: each decode
    emits a token at every end, the prompt advances a chunk per iteration. Returns the requests
    that finished (at the last end), KV freed."""
    steps = len(ends_s)
    hold = state._hold
    for r in decodes:
        r.num_computed_tokens += steps
        hold(r)
    prompt.num_computed_tokens += chunk_tokens * steps
    hold(prompt)
    state.pending_tokens -= steps * (len(decodes) + chunk_tokens)
    first, last = ends_s[0], ends_s[-1]
    # the gaps between consecutive ends, as step-by-step time differences give them
    later_gaps = array("d", [b - a for a, b in zip(ends_s, ends_s[1:], strict=False)]).tobytes()
    for r in decodes:
        r.itl_s.append(first - (r.last_token_s or first))  # as ReplicaState._emit does
        r.itl_s.frombytes(later_gaps)
        r.last_token_s = last
        r.num_output_tokens += steps
        if r.is_finished:
            r.finish_s = last
    if decodes:
        state.futile_preemptions = 0  # tokens emitted: progress
    finished = [r for r in decodes if r.is_finished]
    state._retire(finished)
    state.now_s = last
    state._decodes = None
    state.prompt_tokens_as_decodes = 0
    return finished
