"""Prefill/decode disaggregation: a request's KV cache handed from a prefill worker to a decode
worker, as vLLM's KV connectors (NIXL) and SGLang's disaggregation move it.

The prefill worker runs the prompt and emits the first token (the request has max_tokens = 1
there); with `keep_finished_kv` its state keeps the finished request's blocks, in `in_transit`,
until `release_sent` when the transfer ends. The decode worker first reserves blocks for the
prompt's KV (`reserve_incoming`: all or nothing, leaving the running decodes' next blocks free,
and within the policy's max_num_seqs counting what is reserved), the request then waiting in its
`in_transit`; when the KV has arrived (`start_decoding`) the request joins `running` as a
request whose prompt is done and whose first token is out: its next iteration computes the
first output token's KV and emits the second.
Blocks on both sides are ordinary pool blocks, so every memory check counts them.

The decode side's table carries no prefix hashes: the prompt's blocks arrive whole from the
network, none is matched against the decode worker's cache.
"""

from __future__ import annotations

from core.blocks import BlockTable, NoFreeBlocksError
from core.request import RequestState
from core.state import ReplicaState


def release_sent(state: ReplicaState, req: RequestState) -> None:
    """The prefill side: `req`'s KV has left; free its blocks."""
    state.in_transit.remove(req)
    state.pool.free(req.block_table)


def decode_side(sent: RequestState, output_tokens: int) -> RequestState:
    """The request as a decode worker holds it: the prompt done, the first token out at the
    prefill worker's time, `output_tokens` to generate in all."""
    req = RequestState(sent.req_id, sent.arrival_s, sent.prompt_len, output_tokens)
    req.block_table = BlockTable([], sent.prompt_len)
    req.num_computed_tokens = sent.prompt_len
    req.num_output_tokens = 1
    req.first_token_s = req.last_token_s = sent.first_token_s
    req.num_preemptions = sent.num_preemptions
    return req


def reserve_incoming(state: ReplicaState, req: RequestState, max_num_seqs: int | None) -> bool:
    """The decode side: take blocks for `req`'s prompt KV if they are free and a sequence slot is
    (running plus reserved below `max_num_seqs`); False, changing nothing, otherwise."""
    if max_num_seqs is not None and len(state.running) + len(state.in_transit) >= max_num_seqs:
        return False
    # the running decodes' next blocks stay free: a reservation must not preempt them
    need = -(-req.num_computed_tokens // state.block_size)
    if need + state.decode_growth(state.decodes) > state.num_free_blocks:
        return False
    try:
        state.pool.allocate(req.block_table, req.num_computed_tokens)
    except NoFreeBlocksError:
        return False
    state.in_transit.append(req)
    return True


def start_decoding(state: ReplicaState, req: RequestState) -> None:
    """The decode side: `req`'s KV has arrived; it decodes from the next iteration on."""
    state.in_transit.remove(req)
    state.running.append(req)
    state.pending_tokens += req.tokens_to_go
    state.changed()


def cancel_incoming(state: ReplicaState, req: RequestState) -> None:
    """The decode side: a reservation given back (its stream restarts elsewhere)."""
    if req in state.in_transit:
        state.in_transit.remove(req)
        state.pool.free(req.block_table)
