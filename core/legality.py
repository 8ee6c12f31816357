"""Plan legality: what a policy's plan must satisfy before an executor applies it.

A tile (request, t0, t1, l0, l1, num_cached, logits) is legal from a replica's state when its
request is waiting or running and not finished, its layers lie in [0, L) and its tokens within
the request's tokens so far, it does not span the end of the prompt, num_cached is t0, logits
is set exactly on the tile that reaches the last known token in the last layer, its layers all
stand at t0 and the layer below has reached t1 (the staircase of core/request.py), and the KV
blocks every request of the plan then holds fit the free blocks. A stall-free policy also
decodes every running decode. Each rule broken is a PlanError naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from core.admission import Admission
from costmodel.plan import Tile

if TYPE_CHECKING:
    from core.state import ReplicaState


class PlanError(ValueError):
    """A policy returned an illegal plan; the message names the rule it broke."""


_PLAIN = (int,) * 6 + (bool,)


def as_tile(item: object, index: int) -> Tile:
    """Plan item `index` as a Tile of plain ints (numpy integers converted) and a bool `logits`.

    A tile field of any other type (511.5, None, '3', True) is a PlanError naming the field:
    the simulator's arithmetic and the cost model count whole tokens and layers."""
    if type(item) is Tile and tuple(map(type, item)) == _PLAIN:
        return item  # the usual case, checked first because it is every tile of every plan
    if not isinstance(item, Tile):
        raise PlanError(f"plan item {index} is {type(item).__name__}; plan items must be costmodel.Tile")
    values: list[object] = list(tuple.__iter__(item))  # the stored fields, whatever a subclass overrides
    if len(values) != len(Tile._fields):
        raise PlanError(f"plan item {index} has {len(values)} fields; a Tile has {len(Tile._fields)}")
    for k, (field_name, v) in enumerate(zip(Tile._fields, values, strict=True)):
        want = bool if field_name == "logits" else int
        if type(v) is want:
            continue
        if want is int and isinstance(v, np.integer):
            values[k] = int(v)
        elif want is bool and isinstance(v, np.bool_):
            values[k] = bool(v)
        else:
            shown = f" {repr(v)[:40]}" if type(v) in (int, float, str, bool, type(None)) else ""
            raise PlanError(f"plan item {index}: tile field {field_name} is {type(v).__name__}"
                            f"{shown}; it must be {'a bool' if want is bool else 'an int'}")
    return Tile(*values)  # type: ignore[arg-type]


def check_plan(state: ReplicaState, plan: Sequence[Tile], stall_free: bool) -> tuple[Tile, ...]:
    """Raise PlanError unless `plan` is legal from this state (see the module note), fits the
    free KV blocks, and marks `logits` exactly on the tiles that produce a token. Returns
    the plan as plain Tiles (as_tile)."""
    L = state.num_layers
    by_id = {r.req_id: r for r in state.running}
    by_id.update({r.req_id: r for r in state.waiting})
    seen: dict[int, list[Tile]] = {}
    plain: list[Tile] = []
    for i, item in enumerate(plan):
        tile = as_tile(item, i)
        plain.append(tile)
        rid, t0, t1, l0, l1, cached, logits = tile
        req = by_id.get(rid)
        if req is None:
            raise PlanError(f"tile for request {rid}, which is neither waiting nor running")
        if req.is_finished:
            raise PlanError(f"tile for request {rid}, which has already finished")
        if not (0 <= l0 < l1 <= L):
            raise PlanError(f"tile {tile}: layer range [{l0}, {l1}) outside [0, {L})")
        end = req.num_prompt_tokens + req.num_output_tokens
        if not (0 <= t0 < t1 <= end):
            raise PlanError(f"tile {tile}: token range [{t0}, {t1}) outside the request's "
                            f"{end} tokens so far")
        if t0 < req.num_prompt_tokens < t1:
            raise PlanError(f"tile {tile}: a tile may not span the end of the prompt")
        if cached != t0:
            raise PlanError(f"tile {tile}: num_cached must equal t0 (tokens before it)")
        if logits != (t1 == end and l1 == L):  # the cost model prices the LM head by it
            raise PlanError(f"tile {tile}: logits must be True exactly when the tile reaches "
                            f"the request's last token ({end}) in the last layer")
        seen.setdefault(rid, []).append(tile)
    admission = Admission(state.pool, (), state.hidden_blocks_per_token)
    for rid, tiles in seen.items():
        req = by_id[rid]
        lt = list(req.layer_tokens) if req.layer_tokens is not None else [req.num_computed_tokens] * L
        for _, t0, t1, l0, l1, _, _ in sorted(tiles, key=lambda t: (t.l0, t.t0)):
            if lt[l0:l1].count(t0) != l1 - l0:
                raise PlanError(f"request {rid}: tile tokens [{t0}, {t1}) layers [{l0}, {l1}) "
                                f"does not start where those layers stand ({lt[l0]} tokens)")
            if l0 > 0 and lt[l0 - 1] < t1:
                raise PlanError(f"request {rid}: layers [{l0}, {l1}) run tokens up to {t1} "
                                f"before layer {l0 - 1} has computed them")
            lt[l0:l1] = [t1] * (l1 - l0)
        # what apply's _hold will ask, request by request in the same order
        if not admission.try_admit(req, lt[0], partial=lt[0] != lt[-1]):
            raise PlanError(f"plan needs {admission.cost(req, lt[0], lt[0] != lt[-1])} more KV "
                            f"blocks for request {rid}, only {admission.num_free_blocks} free")
    if stall_free:
        for r in state.decodes:
            if r.req_id not in seen:
                raise PlanError(f"stall-free policy skipped the decode of running request {r.req_id}")
    return tuple(plain)
