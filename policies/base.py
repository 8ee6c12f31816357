"""The policy interface: from a replica's state, the tiles of the next iteration.

A policy is pure: `schedule(state)` reads the state and returns a plan (a tuple of
`costmodel.Tile`); it never mutates the state. The executor (simulator or engine) checks the
plan, prices or runs it, then calls `state.apply(plan, now)`. Policies that claim `stall_free`
are held to it: a plan that skips a running decode is an error.

`steady_decode = True` promises: when nothing is waiting and no prompt is part-way, the plan is
exactly one decode tile for every running request. The simulator then fast-forwards runs of
identical decode iterations in closed form. Leave it False if your policy might do otherwise.
"""

from __future__ import annotations

import traceback
from typing import Protocol, runtime_checkable

from costmodel.plan import Plan, Tile, decode_tile
from policies.state import PlanError, ReplicaState, RequestState


@runtime_checkable
class Policy(Protocol):
    name: str
    stall_free: bool

    def schedule(self, state: ReplicaState) -> Plan: ...


def schedule_checked(policy: Policy, state: ReplicaState) -> Plan:
    """Run a policy the executor does not trust (a user's): its exceptions become a PlanError
    naming the file and line, it must leave the state as it found it, and its plan must be legal
    (ReplicaState.check)."""
    def snapshot() -> tuple[object, ...]:
        return (tuple(map(id, state.waiting)), tuple(map(id, state.running)), state.num_free_blocks,
                tuple((r.num_computed_tokens, r.num_output_tokens, r.num_blocks) for r in state.running))

    before = snapshot()
    try:
        plan = policy.schedule(state)
    except PlanError:
        raise
    except Exception as e:  # a user's code: say where, in one line
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise PlanError(f"policy {policy.name} raised {type(e).__name__}: {e} "
                        f"({frame.filename}:{frame.lineno})") from None
    if snapshot() != before:
        raise PlanError(f"policy {policy.name} changed the replica state; a policy may only read it "
                        "and return tiles")
    if not isinstance(plan, tuple | list):
        raise PlanError(f"policy {policy.name} returned {type(plan).__name__}; a plan is a tuple of Tile")
    plan = tuple(plan)
    state.check(plan, policy.stall_free)
    return plan


def decode_tiles(state: ReplicaState) -> list[Tile]:
    """One decode tile for every running request whose prompt is done."""
    L = state.num_layers
    return [decode_tile(r.req_id, r.num_computed_tokens, L) for r in state.decodes]


def decode_block_growth(state: ReplicaState) -> int:
    """KV blocks the decodes of this iteration will take: admission must leave them free."""
    return sum(max(0, state.blocks_for(r.num_computed_tokens + 1) - r.num_blocks)
               for r in state.decodes)


def prompt_tile(req: RequestState, t1: int, l0: int, l1: int, num_layers: int) -> Tile:
    """A prefill tile of `req` from where layer l0 stands up to token t1 through [l0, l1).

    It produces logits when it completes the prompt's last token in the last layer.
    """
    t0 = req.tokens_at(l0)
    return Tile(req.req_id, t0, t1, l0, l1, t0, t1 == req.num_prompt_tokens and l1 == num_layers)


__all__ = ["Policy", "Plan", "Tile", "ReplicaState", "RequestState", "decode_tiles",
           "decode_block_growth", "prompt_tile"]
