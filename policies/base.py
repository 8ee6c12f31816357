"""The policy interface: from a replica's state, the tiles of the next iteration.

A policy is pure: `schedule(state)` reads the state and returns a plan (a tuple of
`costmodel.Tile`); it never mutates the state. The executor (simulator or engine) checks the
plan, prices or runs it, then calls `state.apply(plan, now)`. Policies that claim `stall_free`
are held to it: a plan that skips a running decode is an error.

`steady_decode = True` promises: when nothing is waiting and no prompt is part-way, the plan is
exactly one decode tile for every running request. The simulator then fast-forwards runs of
identical decode iterations in closed form. Leave it False if your policy might do otherwise.

A built-in policy may also say which iterations follow a plan for certain:
`prefill_ahead(state, plan)` returns the prompt tiles of the iterations after `plan` that it
would plan, each beside every running decode, while the running requests stay the same, the KV
blocks suffice and nothing arrives (chunked: a prompt's later chunks; layered: a batch's later
layer groups; `plan` may start them). None admits a request; only the last may emit tokens,
the first of the prompts it ends, none of them a request's last. The simulator then runs such
prefill stretches without asking again (core/stretch.py), stopping at an arrival. Only
built-ins are taken at their word: checked mode cannot verify it without asking every
iteration.

`steady_while_blocked = True` (built-ins only, the same way) promises more than
`steady_decode`: when the plan is exactly every running decode although requests wait, those
were refused by the state's admission helper, taken in an order that does not change while
the waiting requests stay the same (chunked: arrival order, stopping at the first refusal).
Then the same plan follows until a request finishes (core/step.py says why), and the simulator
fast-forwards it as steady decoding.
"""

from __future__ import annotations

from dataclasses import fields
from itertools import chain
from operator import attrgetter, is_
from typing import Protocol, cast, runtime_checkable

from core.request import RequestState
from core.state import PlanError, ReplicaState
from costmodel.plan import Plan, Tile, decode_tile
from policies import guard


@runtime_checkable
class Policy(Protocol):
    name: str
    stall_free: bool

    def schedule(self, state: ReplicaState) -> Plan: ...


# Every field of a request, read in one C call: a policy may change none of them. Objects are
# compared by identity, so a write of anything new (even an equal-looking value) is seen.
_FIELD_NAMES = ("__class__", *RequestState.__slots__)
_REQUEST_FIELDS = attrgetter(*_FIELD_NAMES)
_CACHES = ("_decodes", "_by_id")  # ReplicaState's caches: rebuilt after a policy (changed())
_STATE_KEYS = tuple(f.name for f in fields(ReplicaState) if f.name not in _CACHES)
_ITL = attrgetter("itl_s")
_LAYER_TOKENS = attrgetter("layer_tokens")


def _snapshot(state: ReplicaState) -> tuple[list[object], list[object]]:
    """What a policy must leave as it found it, in O(waiting + running): the state's fields, its
    queues, every request's fields and per-layer progress, and the length and last value of each
    request's token gaps (not all of them: that would cost O(tokens so far) per iteration)."""
    same: list[object] = [x for kv in vars(state).items() if kv[0] not in _CACHES for x in kv]
    if len(same) != 2 * len(_STATE_KEYS):
        raise RuntimeError("the state's attributes were added to or deleted")
    reqs = [*state.waiting, *state.running]
    same += reqs
    same += chain.from_iterable(map(_REQUEST_FIELDS, reqs))
    same += chain.from_iterable(lt for lt in map(_LAYER_TOKENS, reqs) if lt is not None)
    itls = list(map(_ITL, reqs))
    equal: list[object] = [len(reqs), *map(len, itls), *(a[-1] for a in itls if a)]
    return same, equal


def _unchanged(state: ReplicaState, before: tuple[list[object], list[object]]) -> bool:
    try:
        same, equal = _snapshot(state)
    except Exception:  # a field deleted or replaced by something unreadable
        return False
    return (len(same) == len(before[0]) and all(map(is_, same, before[0]))
            and equal == before[1])


def _what_changed(state: ReplicaState, before: tuple[list[object], list[object]]) -> str:
    """Which part of the state a policy changed, for the message (the error path only). The
    snapshot holds the state's (name, value) pairs, then its requests, then their fields."""
    same, equal = before
    k = 2 * len(_STATE_KEYS)
    now = {key: v for key, v in vars(state).items() if key not in _CACHES}
    added = sorted(set(now) - set(_STATE_KEYS))
    if added:
        return f"its new attribute {added[0]:.40}"
    for name, value in zip(same[0:k:2], same[1:k:2], strict=True):
        if now.get(str(name)) is not value:
            return f"its {name}"
    n = cast(int, equal[0])
    reqs, f = same[k:k + n], len(_FIELD_NAMES)
    if [*state.waiting, *state.running] != reqs:
        return "its waiting or running queue"
    for j, r in enumerate(reqs):
        for name, value in zip(_FIELD_NAMES, same[k + n + j * f:k + n + (j + 1) * f], strict=True):
            if getattr(r, name, None) is not value:
                return f"request {same[k + n + j * f + _FIELD_NAMES.index('req_id')]}'s {name}"
    return "a request's layer_tokens or itl_s"


def schedule_checked(policy: Policy, state: ReplicaState,
                     limit_s: float | None = None) -> Plan:
    """Run a policy the executor does not trust (a user's): whatever it raises becomes a PlanError
    naming the policy and the user's file:line; it has `limit_s` (default SCHEDULE_LIMIT_S) to
    return; it must leave the state as it found it; its plan must be a tuple or list of Tiles with
    int fields, and legal (ReplicaState.check)."""
    limit = guard.SCHEDULE_LIMIT_S if limit_s is None else limit_s
    before = _snapshot(state)
    # `stall_free` and `name` are read in the same guarded call: a property is the user's code too
    out, err, timed_out = guard.call_guarded(
        lambda: (policy.schedule(state), policy.stall_free, policy.name), limit)
    state.changed()  # the policy may have edited the cached `decodes` or `running_by_id`
    if err is not None:
        what = guard.describe(err, timed_out, limit, guard.source_file(policy),
                              guard.defined_at(type(policy), "schedule"))
        raise PlanError(f"policy {guard.policy_label(policy)} {what}")
    if not _unchanged(state, before):
        try:
            what = f" ({_what_changed(state, before)})"
        except Exception:  # the state is too mangled to say more
            what = ""
        raise PlanError(f"policy {guard.policy_label(policy)} changed the replica state{what}; a "
                        "policy may only read the state and return tiles")
    plan, stall_free, name = out
    if not isinstance(plan, tuple | list):
        raise PlanError(f"policy {guard.policy_label(policy)} returned {type(plan).__name__}; a plan "
                        "is a tuple of Tile")
    if type(stall_free) is not bool or not isinstance(name, str):
        attr, value = ("stall_free", stall_free) if type(stall_free) is not bool else ("name", name)
        raise PlanError(f"policy {guard.policy_label(policy)}: '{attr}' became "
                        f"{type(value).__name__}; it must stay a {'bool' if attr == 'stall_free' else 'str'}")
    # the stored items, whatever a tuple or list subclass makes of iteration
    items = tuple.__iter__(plan) if isinstance(plan, tuple) else list.__iter__(plan)
    try:
        return state.check(tuple(items), stall_free)
    except PlanError as e:
        raise PlanError(f"policy {guard.policy_label(policy)}: {e}") from None


def no_prefill_ahead(state: ReplicaState, plan: Plan) -> list[tuple[Tile, ...]]:
    """`prefill_ahead` for a policy whose next tiles are not known before it is asked."""
    return []


def decode_tiles(state: ReplicaState) -> list[Tile]:
    """One decode tile for every running request whose prompt is done."""
    L = state.num_layers
    return [decode_tile(r.req_id, r.num_computed_tokens, L) for r in state.decodes]


def prompt_tile(req: RequestState, t1: int, l0: int, l1: int, num_layers: int) -> Tile:
    """A prefill tile of `req` from where layer l0 stands up to token t1 through [l0, l1).

    It produces logits when it completes the prompt's last token in the last layer.
    """
    t0 = req.tokens_at(l0)
    return Tile(req.req_id, t0, t1, l0, l1, t0, t1 == req.num_prompt_tokens and l1 == num_layers)


__all__ = ["Policy", "Plan", "Tile", "ReplicaState", "RequestState", "decode_tiles",
           "prompt_tile"]
