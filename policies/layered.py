"""Layered prefill (arXiv 2510.08055, "From Tokens to Layers"): schedule prefill along layers.

The stack is split into G contiguous, near-equal layer groups. A batch of prompts (those
waiting together, FCFS, while their total stays within one chunk's worth of tokens; a long
prompt goes alone) runs its whole prefill through one group per iteration; every iteration also
decodes all running requests through every layer. The batch finishes after G iterations, and
each layer sees each prompt once, so expert weights are read once per prompt.

G = max(1, ceil(tokens / chunk_tokens)), at most the number of layers (the published rule).
With `max_groups` set, G is rounded up to a power of two and capped there (the public
implementation's bucket rule). Part-way prompts hold their hidden states at the group frontier;
the replica counts them against KV memory (the state's admission helper prices them). A
prompt with a cached prefix runs only its uncached tokens through the groups.

The policy keeps no memory between calls: the batch in flight is the set of running prompts
part-way through the stack, and its next group starts where their layers stand.
"""

from __future__ import annotations

import math

from core.admission import Admission
from costmodel.plan import Plan, Tile
from policies.base import decode_tiles, prompt_tile
from policies.state import ReplicaState, RequestState


def num_groups(num_tokens: int, num_layers: int, chunk_tokens: int = 512,
               max_groups: int | None = None) -> int:
    g = max(1, math.ceil(num_tokens / chunk_tokens))
    if max_groups is not None:
        g = min(1 << (g - 1).bit_length(), max_groups)
    return min(g, num_layers)


def uncached_tokens(req: RequestState) -> int:
    """The prompt tokens a prefill computes: all but its prefix-cache hit (matched while it
    waits, taken at admission)."""
    hit = req.num_cached_tokens if req.num_cached_tokens >= 0 else req.num_computed_tokens
    return req.num_prompt_tokens - hit


def group_bounds(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous near-equal groups; earlier groups take the remainder layers."""
    base, extra = divmod(num_layers, groups)
    bounds, l0 = [], 0
    for g in range(groups):
        l1 = l0 + base + (1 if g < extra else 0)
        bounds.append((l0, l1))
        l0 = l1
    return bounds


class LayeredPrefill:
    stall_free = True
    steady_decode = True

    def __init__(self, max_groups: int | None = None, chunk_tokens: int = 512,
                 max_num_seqs: int = 256) -> None:
        self.max_groups = max_groups
        self.chunk_tokens = chunk_tokens
        self.max_num_seqs = max_num_seqs
        self.name = "layered" if max_groups is None else f"layered:{max_groups}"

    def groups_for(self, batch_tokens: int, state: ReplicaState) -> list[tuple[int, int]]:
        g = num_groups(batch_tokens, state.num_layers, self.chunk_tokens, self.max_groups)
        return group_bounds(state.num_layers, g)

    def next_group(self, batch: list[RequestState], state: ReplicaState) -> tuple[int, int]:
        """The group the batch runs next: the one starting where its layers stand."""
        L = state.num_layers
        done = batch[0].layers_done_at(batch[0].num_prompt_tokens, L)
        for l0, l1 in self.groups_for(sum(map(uncached_tokens, batch)), state):
            if l0 >= done:
                return l0, l1
        return done, L  # cannot happen for a consistent batch; finish the stack

    def new_batch(self, state: ReplicaState, admission: Admission) -> list[RequestState]:
        """Waiting prompts that start together: FCFS while within one chunk's worth of tokens."""
        batch: list[RequestState] = []
        tokens = 0
        num_seqs = len(state.running)
        for req in state.waiting:
            P = req.num_prompt_tokens
            new = uncached_tokens(req)
            if batch and tokens + new > self.chunk_tokens:
                break
            if num_seqs >= self.max_num_seqs:
                break
            if not admission.try_admit(req, P, partial=True):
                break
            batch.append(req)
            tokens += new
            num_seqs += 1
        return batch

    def current_batch(self, state: ReplicaState) -> list[RequestState]:
        """The prompts part-way through the stack, or else the ones that start now."""
        batch = state.prompts
        return batch or self.new_batch(state, state.admission())

    def prefill_tiles(self, batch: list[RequestState], state: ReplicaState) -> list[Tile]:
        """This iteration's prefill work: the batch's whole prompts through the next group."""
        l0, l1 = self.next_group(batch, state)
        return [prompt_tile(r, r.num_prompt_tokens, l0, l1, state.num_layers) for r in batch]

    def prefill_ahead(self, state: ReplicaState, plan: Plan) -> list[tuple[Tile, ...]]:
        """After a plan that runs the part-way batch (or a batch it starts) through a layer
        group: the batch through each later group, the last emitting the batch's first tokens
        unless that would finish one of them. Layers not reached yet still stand where the
        batch started, so the tiles are known now."""
        prompts = plan[len(state.decodes):]
        batch = state.prompts
        if not batch and prompts and not prompts[0][3]:  # a new batch: the waiting head's
            batch = state.waiting[:len(prompts)]
            if [r.req_id for r in batch] != [t[0] for t in prompts]:
                return []
        if not batch or len(prompts) != len(batch):
            return []
        L = state.num_layers
        l1 = prompts[0][4]
        later = [g for g in self.groups_for(sum(map(uncached_tokens, batch)), state) if g[0] >= l1]
        if any(r.max_tokens <= 1 for r in batch):
            later = later[:-1]
        return [tuple(prompt_tile(r, r.num_prompt_tokens, a, b, L) for r in batch)
                for a, b in later]

    def schedule(self, state: ReplicaState) -> Plan:
        tiles: list[Tile] = decode_tiles(state)
        batch = self.current_batch(state)
        if batch:
            tiles.extend(self.prefill_tiles(batch, state))
        return tuple(tiles)
