"""Chunked prefill (Sarathi-Serve, OSDI'24): stall-free batching under a token budget.

Each iteration packs every running decode first, then continues the prompt that is part-way,
then starts waiting prompts in arrival order, cutting the last one to the budget left. Every
tile spans all layers, so a prompt of P tokens takes about P / budget iterations. A waiting
prompt starts after its cached prefix (num_computed_tokens) and is admitted only if its
chunk's KV blocks fit beside the decodes' growth (the state's admission helper); arrival order
is kept (no skipping ahead), as in vLLM.
"""

from __future__ import annotations

from costmodel.plan import Plan, Tile
from policies.base import decode_tiles, prompt_tile
from policies.state import ReplicaState, RequestState


class ChunkedPrefill:
    stall_free = True
    steady_decode = True
    steady_while_blocked = True

    def __init__(self, max_num_batched_tokens: int = 512, max_num_seqs: int = 256) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError("chunked: the token budget must be >= 1")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.name = f"chunked:{max_num_batched_tokens}"

    def prompt_order(self, state: ReplicaState) -> list[RequestState]:
        """Waiting prompts in the order they are started. Subclasses may reorder (e.g. SJF)."""
        return state.waiting

    def prefill_ahead(self, state: ReplicaState, plan: Plan) -> list[tuple[Tile, ...]]:
        """After a plan whose one prompt tile is a full chunk (the budget the decodes leave) of
        a part-way prompt, or of a waiting one it starts: the same prompt's next chunks, the
        budget going to it alone, then its last chunk, which emits its first token. The last
        is left out where it would finish the request, and where it leaves budget while another
        request waits (that one would start beside it)."""
        L = state.num_layers
        prompts = plan[len(state.decodes):]
        if len(prompts) != 1:
            return []
        rid, t0, t1, l0, l1, _cached, _logits = prompts[0]
        req = next((r for r in state.running if r.req_id == rid), None)
        if req is None and state.waiting and state.waiting[0].req_id == rid:
            req = state.waiting[0]  # started by this plan: FCFS starts the head
        n = t1 - t0
        if (req is None or l0 or l1 != L or n != self.max_num_batched_tokens - len(state.decodes)
                or t0 != req.num_computed_tokens):
            return []
        out: list[tuple[Tile, ...]] = []
        end = req.num_prompt_tokens
        while t1 + n < end:
            out.append((Tile(rid, t1, t1 + n, 0, L, t1, False),))
            t1 += n
        others_wait = len(state.waiting) > (bool(state.waiting) and state.waiting[0] is req)
        if t1 < end and req.max_tokens > 1 and (t1 + n == end or not others_wait):
            out.append((Tile(rid, t1, end, 0, L, t1, True),))
        return out

    def schedule(self, state: ReplicaState) -> Plan:
        L = state.num_layers
        tiles: list[Tile] = decode_tiles(state)
        budget = self.max_num_batched_tokens - len(tiles)
        admission = state.admission()
        for req in state.prompts:  # part-way prompts keep their place
            if budget <= 0:
                break
            start = req.num_computed_tokens
            t1 = min(req.num_prompt_tokens, start + budget)
            if not admission.try_admit(req, t1):
                break
            tiles.append(prompt_tile(req, t1, 0, L, L))
            budget -= t1 - start
        num_seqs = len(state.running)
        for req in self.prompt_order(state):
            if budget <= 0 or num_seqs >= self.max_num_seqs:
                break
            start = req.num_computed_tokens  # its prefix-cache hit
            t1 = min(req.num_prompt_tokens, start + budget)
            if not admission.try_admit(req, t1):
                break
            tiles.append(prompt_tile(req, t1, 0, L, L))
            budget -= t1 - start
            num_seqs += 1
        return tuple(tiles)
