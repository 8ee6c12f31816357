"""Fast-forward: runs of iterations known in advance, priced at once and waited for in one event.

Steady decoding is fast-forwarded: when the policy promises `steady_decode`, no prompt waits
and none is part-way (prepare's STEADY), the next K iterations are identical decode batches
whose contexts grow by one token each, so their latencies are an affine function of the step
(only decode attention's KV reads grow, at a fixed FLOP/byte ratio). We price the first and
last step (or every step, on measured tables) and wait for their sum in one event; each step's
end is the running sum of the latencies from the run's start, as SimPy adds timeouts one by
one, so a step ends at the instant stepping reaches (which of two events at one instant goes
first may still differ: the README's limitations). An arrival
interrupts the run at the end of the step in flight, and the state's apply_steady applies the
steps done. K stops at the first request to
finish, at the KV blocks left (core's steady_steps), and where a request's context reaches a
sliding window (past it that layer's KV read stops growing), so the form is exact. The run's
record row sums its steps' figures: in closed form where every step was priced (the features
are affine in the step: CostModel.decode_run_totals), else from the two ends.

Prefill stretches (core/stretch.py) run alike: each iteration priced from its totals (exact:
no interpolation, CostModel.price_stretch), all waited for in one event, stopped after the
iteration in flight by an arrival. A chunked prompt's whole prefill is one stretch when
nothing arrives meanwhile: from the plan that starts it to the chunk that emits its first token.
A plan of every decode and prompt tiles that starts no stretch runs alone, but is priced and
applied from the decodes' totals too (`run_with_decodes`: no pass over a tile per decode).
"""

from __future__ import annotations

from bisect import bisect_left
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING

import numpy as np
import simpy

from core.request import RequestState
from core.step import steady_steps
from core.stretch import apply_stretch, stretch_steps
from costmodel.plan import Tile
from costmodel.price import CostModel

if TYPE_CHECKING:
    from sim.replica import Replica


def next_hop_s(now_s: float, end_s: float) -> float:
    """The delay of the next timeout toward end_s, which a run's last step must end on exactly
    (stepping's running sum): end_s - now_s where SimPy's now_s + delay lands there; else
    (now_s under half of end_s, the difference rounded, and not every end_s reachable from
    now_s in one addition) three quarters of it, which lands past end_s / 2, from where the
    difference is exact (Sterbenz) and the next hop lands."""
    d = end_s - now_s
    return d if now_s + d == end_s else 0.75 * d


def wait_until(env: simpy.Environment, end_s: float):  # type: ignore[no-untyped-def]
    """Timeouts until the clock stands at end_s exactly (at most two)."""
    while env.now < end_s:
        yield env.timeout(next_hop_s(env.now, end_s))


_COMPUTED = attrgetter("num_computed_tokens")
_ID = attrgetter("req_id")
_REQ_ID = itemgetter(0)  # a tile's request


# ---- steady decoding -------------------------------------------------------------------------
def steady_decode(replica: Replica, max_steps: int | None = None):  # type: ignore[no-untyped-def]
    env, state, cm = replica.env, replica.state, replica.cost
    running = state.running
    n = len(running)
    # A single step needs no count: whatever steady_steps says, a run of at least one goes
    # ahead (below), and prepare gave every decode its next block.
    k = 1 if max_steps == 1 else steady_steps(state)
    if max_steps is not None:  # up to the next planning point (async scheduling)
        k = min(k, max_steps)
    kv = sum(map(_COMPUTED, running)) + n  # the first step's read: every context + 1
    w = cm.model.sliding_window
    kv_win = growth = 0  # the windowed read, and how much it grows a step
    if w:  # a window's KV read stops growing at w: stop there so every step stays affine
        context = np.fromiter(map(_COMPUTED, running), np.int64, n)  # [running]
        below = context[context + 1 < w]
        growth = len(below)
        if growth:
            k = min(k, max(1, w - int(below.max())))
        kv_win = int(np.minimum(context + 1, w).sum())
    if k <= 0:  # cannot grow at all: let the normal path preempt or stall
        k = 1
    steps = np.arange(k)  # [k]
    # measured tables price every step (None: affine in the read, two prices give the rest)
    latencies = cm.decode_latencies_s(n, kv + n * steps, kv_win + growth * steps) if k > 1 else None
    c0 = c_last = None
    if latencies is None or type(cm).price_decodes is not CostModel.price_decodes:
        c0 = cm.price_decodes(n, kv, kv_win, None if latencies is None else float(latencies[0]))
        c_last = c0 if k == 1 else cm.price_decodes(
            n, kv + n * (k - 1), kv_win + growth * (k - 1),
            None if latencies is None else float(latencies[-1]))
    start = env.now
    if latencies is None:  # affine: the two ends give every step
        assert c0 is not None and c_last is not None
        l0 = c0.latency_s
        slope = (c_last.latency_s - l0) / (k - 1) if k > 1 else 0.0
        latencies = l0 + slope * steps  # [k]
        priced = False
    else:
        priced = True
    # each step's end as SimPy adds the steps' timeouts one by one (cumsum adds left to
    # right: start, + the first, + the next...), so that an event at a step's end is seen
    # in the same order as stepping would see it
    latencies[0] += start
    ends = np.cumsum(latencies)  # [k]
    last_s = float(ends[k - 1])
    yield replica._sleep_until(last_s)
    done = k
    if env.now < last_s:  # an arrival: finish the step in flight (even an ulp short), then stop
        lo = int(ends.searchsorted(env.now, side="left"))  # the first to end at or after now
        done = lo + 1
        yield from wait_until(env, float(ends[lo]))
    end_s = float(ends[done - 1])
    # the gaps as step-by-step time differences give them (np.diff's, less its overhead)
    gaps = (ends[1:done] - ends[:done - 1]).tobytes()
    finished = state.apply_steady(done, float(ends[0]), gaps, end_s)
    if replica.check:
        replica._check_invariants()
    replica.busy_s += end_s - start
    recorder = replica.recorder
    if c0 is None:  # every step priced: the figures summed in closed form
        recorder.iteration_row(
            replica=replica.idx, start_s=start, latency_s=end_s - start, iterations=done,
            prefill_tokens=0, decode_tokens=done * n, num_tiles=n, prefill_layer_tokens=0,
            **cm.decode_run_totals(n, kv, kv_win, growth, done, end_s - start))
    else:
        assert c_last is not None
        frac = (done - 1) / (k - 1) if k > 1 else 0.0
        recorder.steady(replica.idx, start, end_s - start, done, n, c0, c_last, frac,
                        cm.busy_power_w if priced else None)
    for r in finished:
        replica._finished(r)


# ---- prefill stretches (core/stretch.py) -----------------------------------------------------
def prefill_stretch(replica: Replica, plan: tuple[Tile, ...]
                    ) -> tuple[list[RequestState], list[tuple[Tile, ...]]] | None:
    """(decodes, each iteration's prompt tiles) when `plan` is a tile for every running
    decode, in order, plus prompt tiles: a stretch where they emit nothing, are of running
    prompts or of waiting ones it starts with nothing cached, and the policy knows at least
    one more such iteration, the last of which may emit first tokens (none the last token);
    else this plan alone (one iteration: run_with_decodes). None where the plan is not every
    decode and prompt tiles."""
    state = replica.state
    decodes = state.decodes
    prompts = plan[len(decodes):]
    if not prompts:
        return None
    # each decode's own tile, in order (a built-in's decode tiles are decode_tile's: the ids
    # say it, compared in one pass at C speed: this runs every iteration over the whole batch)
    if list(map(_REQ_ID, plan[:len(decodes)])) != list(map(_ID, decodes)):
        return None
    alone = (decodes, [prompts])
    if any(t[6] for t in prompts):  # a token now: no stretch
        return alone
    assert replica.prefill_ahead is not None
    ahead = replica.prefill_ahead(state, plan)
    if not ahead:
        return alone
    by_id = state.running_by_id
    for rid, t0, t1, *_ in prompts:
        if t1 - t0 < 1:
            return alone
        if rid not in by_id:  # started by the plan: its blocks are all taken as it grows
            req = next((r for r in state.waiting if r.req_id == rid), None)
            if req is None or req.num_computed_tokens or req.block_table.num_blocks:
                return alone
            by_id = {**by_id, rid: req}  # a copy: the state's is the running ones
    steps = [prompts, *ahead]
    for j, tiles in enumerate(steps):
        for rid, t0, t1, _l0, _l1, _c, logits in tiles:
            if rid not in by_id or t1 - t0 < 1 or (
                    logits and (j < len(steps) - 1 or by_id[rid].max_tokens <= 1)):
                return alone
    k = stretch_steps(state, decodes, steps, by_id)
    return (list(decodes), steps[:k]) if k >= 2 else alone


def run_with_decodes(replica: Replica, plan: tuple[Tile, ...], decodes: list[RequestState],
                     prompts: tuple[Tile, ...]):  # type: ignore[no-untyped-def]
    """One iteration of every decode and `prompts` (`plan`), as the replica's loop runs it,
    priced and applied from the decodes' totals (CostModel.price_with_decodes: the same
    IterationCost as `price`) without a pass over their tiles."""
    env, state, cm = replica.env, replica.state, replica.cost
    n = len(decodes)
    kv = sum(map(_COMPUTED, decodes)) + n
    w = cm.model.sliding_window
    kv_win = sum(c + 1 if c < w else w for c in map(_COMPUTED, decodes)) if w else 0
    cost = cm.price_with_decodes(n, kv, kv_win, prompts)
    start = env.now
    yield env.timeout(cost.latency_s)
    finished = state.apply(prompts, env.now, decodes=decodes)
    if replica._on_commit is not None:
        replica._on_commit(plan, env.now)
    replica.busy_s += cost.latency_s
    # a prompt's last token alone is counted with the prompts already (no rebooking)
    replica.recorder.iteration(replica.idx, start, cost, len(plan), 1)
    for req in finished:
        replica._finished(req)


def run_prefill_stretch(replica: Replica, decodes: list[RequestState],
                        steps: list[tuple[Tile, ...]]):  # type: ignore[no-untyped-def]
    """Price the stretch's iterations one by one (exact: no interpolation), wait for them
    in one event, stop after the iteration in flight when a request arrives, apply."""
    env, state, cm = replica.env, replica.state, replica.cost
    n = len(decodes)
    w = cm.model.sliding_window
    if w:
        contexts = list(map(_COMPUTED, decodes))
        windows = [sum(x + j + 1 if x + j < w else w for x in contexts)
                   for j in range(len(steps))]
    else:
        windows = []
    prices = cm.price_stretch(n, sum(map(_COMPUTED, decodes)) + n, windows, steps)
    start = t = env.now
    ends: list[float] = []
    for latency_s in prices.latencies_s:
        t = t + latency_s  # as SimPy adds each iteration's timeout to its start
        ends.append(t)
    yield replica._sleep_until(t)
    done = len(steps)
    if env.now < t:  # an arrival: finish the iteration in flight (even an ulp short), then stop
        done = bisect_left(ends, env.now) + 1
        yield from wait_until(env, ends[done - 1])
    finished = apply_stretch(state, decodes, steps[:done], ends[:done])
    end_s = ends[done - 1]
    replica.busy_s += end_s - start
    replica.recorder.iteration_row(
        replica=replica.idx, start_s=start, latency_s=end_s - start, iterations=done,
        decode_tokens=done * n, num_tiles=n + len(steps[0]), **prices.totals(done))
    for r in finished:
        replica._finished(r)
