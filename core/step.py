"""The serving step both executors run: prepare a plan, execute it (theirs), commit it.

    step = prepare(state, policy, now_s, checked=..., on_preempt=...)
    RUN:    tables = reserve(state, step.plan)    # optional: the plan's KV blocks, taken now
            execute step.plan (the simulator prices and waits; the engine runs the model)
            commit(state, step.plan, end_s)       # tokens emitted at end_s, finished freed
    STEADY: every running request decodes and nothing else can start: the simulator may apply
            K identical decode steps at once, apply_steady(state, K, ...)
    WAIT:   the policy declines the work it holds: wait for an arrival

`prepare` first preempts (recompute) the newest running requests until every decode has its
next KV block; then matches every waiting request's prefix against the cache (its
`num_computed_tokens` becomes its hit: ReplicaState.match_waiting) and asks the policy for a
plan (under guard and checked, policies.base's
schedule_checked, unless the executor trusts it). An empty plan while prompts are part-way
and nothing decodes means they filled the KV and none can grow: the newest is preempted and
the policy asked again. A prefill worker of disaggregated serving whose blocks wait on KV in
transit waits instead, as the transfer's end frees them; when a transfer still waits for
decode blocks, which its own streaming prompts may hold, it first recomputes them all, their
streams and decode blocks given back (core/handoff.py), rather than restart one at once. Every victim goes to
`on_preempt` (the recorder; the engine drops its hidden states: the core has freed the
victim's KV blocks, which are the engine's pages).
Preemptions in a row that undo no new work with no token between them are a livelock, a
PlanError naming the policy.

STEADY comes before asking the policy when nothing waits and every running request decodes
(its `steady_decode` promise). With `blocked_steady` it also comes after asking, when requests
wait but the plan is every running decode and nothing else, and the policy promised (a
built-in's `steady_while_blocked`, policies/base.py) that it admits in order only what fits
beside the decodes' growth: the free blocks then only shrink (each step takes what the
admission reserved for it), so a prompt refused now is refused at every step until a request
finishes, and the same plan follows. Only without prefix caching: with it, a block another
request caches or evicts could change a waiting prompt's hit, and so its cost.

`commit` contract, so that several plans may be in flight (one per pipeline stage): it reads
and changes only the requests its plan's tiles name, looked up by id when it runs, and takes
their KV blocks then. Other requests may have been admitted, advanced, preempted or finished
since `prepare` (by other commits); the plan's own requests must still stand where the plan
starts them (no other plan in flight may move, preempt or finish them before this commit).

`reserve` takes, before the plan runs, exactly the KV blocks `commit` would take for it: the
plan's new requests are admitted (references on their prefix hits) before any table grows, then
each table grows, in plan order, to the tokens its layer 0 reaches and the hidden-state blocks
its frontier holds after the plan - what ReplicaState.apply asks of the pool. Admitting and
growing are idempotent (BlockPool.admit takes a prefix once; allocate to what a table already
holds changes nothing), so the commit that follows finds the blocks held and takes none twice;
only the queues (waiting -> running), progress, tokens and the prefix cache's new entries wait
for the commit. An executor that writes KV while it executes (the engine) calls it to know
where: the returned tables' `block_ids` are the pages of each request, in token order. The
simulator writes no KV and lets commit allocate. Between `reserve` and its `commit` nothing
else may change the pool.

`apply_steady` is K commits of one decode tile per running request in closed form: step j
(0-based) ends at first_end_s + j * first_latency_s + slope_s * j * (j + 1) / 2 - its latency
grows affinely with the context - which is what the simulator's fast-forward prices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from core.blocks import BlockTable, NoFreeBlocksError, hidden_state_blocks
from core.request import RequestState
from core.state import PlanError, ReplicaState
from costmodel.plan import Tile
from policies import guard
from policies.base import schedule_checked

if TYPE_CHECKING:
    from policies.base import Policy

# Preemptions in a row that undo no new work, with no token between them: a livelock (a real
# run's worst thrash is a few per running request before a token comes out).
LIVELOCK_PREEMPTIONS = 1000

RUN, STEADY, WAIT = "run", "steady", "wait"


class Step(NamedTuple):
    action: str  # RUN, STEADY or WAIT
    plan: tuple[Tile, ...] = ()  # RUN's tiles


class Committed(NamedTuple):
    emitted: list[RequestState]  # requests that emitted a token, in plan order
    finished: list[RequestState]  # those of them that finished (KV freed, out of `running`)


_STEADY, _WAIT = Step(STEADY), Step(WAIT)


def prepare(state: ReplicaState, policy: Policy, now_s: float, *, checked: bool,
            on_preempt: Callable[[RequestState], object], replica: int = 0,
            fast_forward: bool = False, blocked_steady: bool = False) -> Step:
    """The next step at `now_s` for a replica holding work (see the module note). `checked`:
    run the policy under guard and check its plan (a user's policy); `fast_forward`: the
    executor can apply steady decoding in closed form (the policy promised `steady_decode`);
    `blocked_steady`: also while requests wait that the policy cannot admit (its promise)."""
    state.now_s = now_s
    for victim in state.preempt_for_decodes():
        on_preempt(victim)
    _check_progress(state, policy, replica)
    while True:
        # every running request decoding (finished ones have left `running`)
        if fast_forward and not state.waiting and len(state.decodes) == len(state.running):
            return _STEADY
        state.match_waiting()  # prefix hits as of now: waiting prompts start after them
        plan = schedule_checked(policy, state) if checked else policy.schedule(state)
        if plan:
            if (blocked_steady and len(plan) == len(state.running) == len(state.decodes)
                    and not state.pool.enable_prefix_caching):
                return _STEADY  # the plan is every decode: it repeats until a request finishes
            return Step(RUN, plan)
        if not state.running or state.decodes:
            return _WAIT
        if state.keep_finished_kv and state.in_transit:  # a prefill worker (core/handoff.py)
            if state.transit_may_wait_on_streams:  # give every stream's decode blocks back
                while state.running:
                    on_preempt(state.preempt_newest())
            return _WAIT  # a transfer's end frees blocks and wakes it
        # Part-way prompts filled the KV and none can grow: recompute the newest.
        on_preempt(state.preempt_newest())
        _check_progress(state, policy, replica)


def commit(state: ReplicaState, plan: tuple[Tile, ...], end_s: float) -> Committed:
    """Apply an executed plan's effects at `end_s` (see the module note for what it may assume)."""
    emitted: list[RequestState] = []
    finished = state.apply(plan, end_s, emitted)
    return Committed(emitted, finished)


def reserve(state: ReplicaState, plan: tuple[Tile, ...]) -> dict[int, BlockTable]:
    """Take the KV blocks `commit` will find for `plan` (see the module note); return the block
    tables of the plan's requests by id. A PlanError, as commit's, when the pool cannot."""
    L = state.num_layers
    by_id = dict(state.running_by_id)
    reach: dict[int, list[int]] = {}  # req_id -> [layer 0's tokens, the last layer's] after the plan
    admit: list[RequestState] = []
    for rid, _t0, t1, l0, l1, _cached, _logits in plan:
        ends = reach.get(rid)
        if ends is None:
            req = by_id.get(rid)
            if req is None:  # admitted by this plan
                req = by_id[rid] = next(r for r in state.waiting if r.req_id == rid)
                admit.append(req)
            ends = reach[rid] = [req.tokens_at(0), req.tokens_at(L - 1)]
        if l0 == 0:
            ends[0] = max(ends[0], t1)
        if l1 == L:
            ends[1] = max(ends[1], t1)
    pool = state.pool
    for req in admit:  # every new request's prefix before any growth, as apply does
        pool.admit(req.block_table)
    tables: dict[int, BlockTable] = {}
    for rid, (top, low) in reach.items():
        table = by_id[rid].block_table
        extra = hidden_state_blocks(top, state.hidden_blocks_per_token) if top != low else 0
        try:
            pool.allocate(table, top, extra)
        except NoFreeBlocksError as e:
            raise PlanError(f"plan needs more KV blocks for request {rid}: {e}") from None
        tables[rid] = table
    return tables


def steady_steps(state: ReplicaState) -> int:
    """How many identical decode steps may follow from here: none of the running requests
    finishes before the last of them, and each step's KV blocks are free."""
    running = state.running
    most = min(r.max_tokens - r.num_output_tokens for r in running)
    # a running decode holds KV for every token it computed, so it takes at most
    # ceil(most / block_size) blocks in `most` steps: where all of those fit, no count
    if len(running) * -(-most // state.block_size) <= state.num_free_blocks:
        return most
    return state.decode_steps_that_fit(running, most)


def apply_steady(state: ReplicaState, steps: int, first_end_s: float, first_latency_s: float,
                 slope_s: float, end_s: float) -> list[RequestState]:
    """`steps` decode steps of every running request (see the module note); the last ends at
    `end_s`. Returns the requests that finished, KV freed."""
    # step j's latency is the gap before its token; the same for every request in the batch
    gaps = (np.arange(1, steps) * slope_s + first_latency_s).tobytes()
    return state.apply_steady(steps, first_end_s, gaps, end_s)


def _check_progress(state: ReplicaState, policy: Policy, replica: int) -> None:
    """Preemption after preemption that undoes no new work, with no token emitted between
    them, is a livelock: a policy that is not stall-free keeps restarting a part-way prompt
    (e.g. by returning only decodes while it waits) and time runs on for ever."""
    if state.futile_preemptions >= LIVELOCK_PREEMPTIONS:
        raise PlanError(f"policy {guard.policy_label(policy)} makes no progress: "
                        f"{state.futile_preemptions} preemptions in a row on replica "
                        f"{replica} restarted prompts that got no further and no token was "
                        "emitted; a plan must eventually finish the prompts it starts")
