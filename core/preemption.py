"""Preemption: vLLM's recompute. When the running decodes' next KV blocks are not free, the newest
running request frees its KV and goes back to the head of the waiting queue to redo its prefill,
its output so far folded into the prompt (ReplicaState.preempt_for_decodes and preempt_newest).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.request import RequestState
    from core.state import ReplicaState


def preempt_for_decodes(state: ReplicaState) -> list[RequestState]:
    """Recompute-preempt the newest running requests until every decode has its next block.
    Returns the victims."""
    victims: list[RequestState] = []
    decodes = state.decodes
    if len(decodes) <= state.num_free_blocks:  # a decode needs at most one new block
        return victims
    need = state.decode_growth(decodes)
    left = len(decodes)  # decodes[:left] still run: a victim decoding is the last of them
    while need > state.num_free_blocks and state.running:
        if left and state.running[-1] is decodes[left - 1]:
            left -= 1
            need -= state.decode_growth(decodes[left:left + 1])  # the sum less its term
        victims.append(preempt_newest(state))
    return victims


def preempt_newest(state: ReplicaState) -> RequestState:
    """Free the newest running request's KV; it redoes its prefill from the waiting head."""
    victim = state.running.pop()
    state.changed()  # decodes and running_by_id
    work = sum(victim.layer_tokens) if victim.layer_tokens is not None else (
        victim.num_computed_tokens * state.num_layers)
    if work > victim.peak_work:  # it got further than ever before: progress, not a livelock
        victim.peak_work = work
        state.futile_preemptions = 0
    else:
        state.futile_preemptions += 1
    state.pool.free(victim.block_table)
    state.pending_tokens += victim.num_computed_tokens  # prompt + max_tokens stays the same
    victim.num_computed_tokens = 0
    victim.layer_tokens = None
    # Generated tokens are kept as part of the prompt to recompute (vLLM's recompute).
    victim.num_prompt_tokens += victim.num_output_tokens
    victim.block_table.num_prompt_tokens = victim.num_prompt_tokens  # hits stop short of it
    victim.max_tokens -= victim.num_output_tokens
    victim.num_output_tokens = 0
    victim.num_preemptions += 1
    state.num_preemptions += 1
    state.waiting.insert(0, victim)
    return victim
