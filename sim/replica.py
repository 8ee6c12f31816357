"""One serving replica as a SimPy process: core/step.py's serving step on the cost model's clock.

    step = prepare(state, policy, env.now, ...)     # preemptions, then the policy's plan
    cost = cost_model.price(step.plan)
    yield env.timeout(cost.latency_s)
    commit(state, step.plan, env.now)

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
sliding window (past it that layer's KV read stops growing), so the form is exact.

In checked mode (a user's policy, or --check) the promise is verified where it is used: at the
start of each steady run the policy is asked once, through schedule_checked, and a plan other
than one decode tile per running request is a PlanError (_verify_steady_claim).

Async scheduling (vLLM's --async-scheduling, `async_scheduling`): the engine plans iteration n+1
while n runs, so a request that arrives while an iteration is in flight is first seen when n+2
is planned. Such a request waits here, outside the state, for two planning points (the end of
the iteration in flight, then the end of the next); while one waits, no run is fast-forwarded
past the next planning point. A replica with nothing else to plan (none running or waiting, or
a policy that plans nothing) takes it at once, as vLLM's engine does with no batch queued.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import simpy

from core.records import Recorder, prefill_tokens_once
from core.request import RequestState
from core.state import PlanError, ReplicaState
from core.step import STEADY, WAIT, commit, prepare, steady_steps
from core.stretch import apply_stretch, stretch_steps
from costmodel.plan import Tile, decode_tile
from policies import guard
from policies.base import Policy, no_prefill_ahead, schedule_checked
from policies.registry import is_trusted
from sim.stall import StallMonitor

if TYPE_CHECKING:
    from costmodel.price import CostModel, IterationCost


class Replica:
    def __init__(self, env: simpy.Environment, idx: int, policy: Policy, cost_model: CostModel,
                 num_blocks: int, block_size: int, hidden_blocks_per_token: float,
                 recorder: Recorder, check: bool = False, fast_forward: bool = True,
                 on_finish: Callable[[], None] | None = None, trusted: bool | None = None,
                 async_scheduling: bool = False) -> None:
        """`trusted`: run the policy unchecked (default: only the registry's built-ins are)."""
        self.env = env
        self.idx = idx
        self.policy = policy
        self.cost = cost_model
        self.state = ReplicaState(num_layers=cost_model.model.num_layers, num_total_blocks=num_blocks,
                                  block_size=block_size,
                                  hidden_blocks_per_token=hidden_blocks_per_token,
                                  cost_model=cost_model)
        self.recorder = recorder
        self.trusted = is_trusted(policy) if trusted is None else trusted
        self.check = check or not self.trusted
        # a user's promise, read once under guard: only a real True enables the fast-forward
        steady, why = (getattr(policy, "steady_decode", False), None) if self.trusted else (
            guard.read_attr(policy, "steady_decode"))
        if why is not None:
            raise PlanError(f"policy {guard.policy_label(policy)}: reading its 'steady_decode' {why}")
        self.fast_forward = fast_forward and steady is True
        # prefill stretches: a built-in's word (policies/base.py), not checked per iteration
        ahead = getattr(policy, "prefill_ahead", None) if self.trusted else None
        self.prefill_ahead = (ahead if fast_forward and not self.check
                              and ahead is not no_prefill_ahead else None)  # asked every iteration
        # steady decoding while requests wait that cannot be admitted: a built-in's word too
        self.blocked_steady = (self.fast_forward and not self.check
                               and getattr(policy, "steady_while_blocked", False) is True)
        self.num_finished = 0  # requests finished here (a policy that finishes none may be stuck)
        self.declined = False  # asleep after an empty plan although it holds runnable work
        self.stall_note: str | None = None  # set when the run ended with work the policy declined
        self._wakeup = env.event()
        self._on_finish = on_finish
        self.busy_s = 0.0
        self.outstanding = 0  # requests routed here and not finished (for routers)
        # told this replica's index whenever its load (outstanding, pending_tokens) may have
        # changed: a router that keeps replicas ordered by load (sim/router.py)
        self.on_load: Callable[[int], None] | None = None
        self.async_scheduling = async_scheduling
        # the workers' hooks (sim/workers.py), None where not overridden: a plain replica's
        # loop makes no call for them (the calls cost about a tenth of a fleet run)
        cls = type(self)
        self._hook = (None if cls._planning_point_hook is Replica._planning_point_hook
                      else self._planning_point_hook)
        self._on_commit = None if cls._committed is Replica._committed else self._committed
        self._in_flight = False  # an iteration (or a fast-forwarded run of them) is executing
        self._deferred: list[tuple[int, RequestState]] = []  # (planning points left, request)
        self._deferred_tokens = 0  # their pending tokens: routers see them (vLLM queued them)
        self.process = env.process(self.run())

    # ---- arrivals ---------------------------------------------------------------------------
    def submit(self, req: RequestState) -> None:
        if self.async_scheduling and self._in_flight:  # the next iteration is planned already
            self._deferred.append((2, req))
            self._deferred_tokens += req.tokens_to_go
        else:
            self.state.enqueue(req)
        self.outstanding += 1
        if self.on_load is not None:
            self.on_load(self.idx)
        self.wake()

    def wake(self) -> None:
        """End a fast-forwarded run after the iteration in flight, as an arrival does (the
        measured window opening: no run may straddle it)."""
        if not self._wakeup.triggered:
            self._wakeup.succeed()

    @property
    def pending_tokens(self) -> int:
        """Tokens still to compute through the whole stack here (the jsq-tokens router's load):
        core's running sum, which checked mode compares with a recount, and those of requests
        waiting to be planned (async scheduling)."""
        return self.state.pending_tokens + self._deferred_tokens

    def _sleep(self) -> simpy.Event:
        if self._wakeup.triggered:
            self._wakeup = self.env.event()
        return self._wakeup

    def _sleep_until(self, delay_s: float) -> simpy.Event:
        """The wake-up event, triggered after `delay_s` unless an arrival (submit) triggers it
        first: one event rather than a condition over two; a stale timer finds it triggered
        and does nothing."""
        wake = self._sleep()

        def ring(_: simpy.Event) -> None:
            if not wake.triggered:
                wake.succeed()
        self.env.timeout(delay_s).callbacks.append(ring)  # type: ignore[union-attr]
        return wake

    # ---- the loop ---------------------------------------------------------------------------
    def run(self):  # type: ignore[no-untyped-def]
        env, state, recorder = self.env, self.state, self.recorder
        while True:
            settle = self._hook() if self._hook is not None else None
            if settle is not None:  # the hook's planning point is taken again after it
                yield settle
                continue
            if self._deferred:
                self._planning_point()
            if not state.running and not state.waiting:
                self._in_flight = False
                yield self._sleep()
                continue
            self._in_flight = True  # from planning on: the WAIT below is the one way back
            deferring = bool(self._deferred)  # a run must not pass the next planning point
            step = prepare(state, self.policy, env.now, checked=self.check,
                           on_preempt=self._preempted, replica=self.idx,
                           fast_forward=self.fast_forward, blocked_steady=self.blocked_steady)
            # The load changed since the last report (the last step's tokens and finishes,
            # preemptions, prefix hits) and will not again before this step ends (nor before
            # sleeping: an empty replica's last finish reported).
            if self.on_load is not None:
                self.on_load(self.idx)
            if step.action is STEADY:
                if self.check:
                    self._verify_steady_claim()
                yield from self._steady_decode(max_steps=1 if deferring else None)
                continue
            if step.action is WAIT:
                if self._deferred:  # no batch planned: vLLM's engine takes new requests at once
                    self._planning_point(release_all=True)
                    continue
                # The policy declines work that could run: wait for an arrival (a policy may
                # wait), watched in case none ever comes (sim/stall.py).
                self._in_flight = False
                self.declined = True
                StallMonitor.of(env).watch(self)
                yield self._sleep()
                self.declined = False
                continue
            plan = step.plan
            if self.prefill_ahead is not None and not deferring:
                stretch = self._prefill_stretch(plan)
                if stretch is not None:
                    yield from self._run_prefill_stretch(*stretch)
                    continue
            cost = self.cost.price(plan)
            start = env.now
            yield env.timeout(cost.latency_s)
            finished = commit(state, plan, env.now).finished
            if self._on_commit is not None:
                self._on_commit(plan, env.now)
            if self.check:
                self._check_invariants()
            self.busy_s += cost.latency_s
            recorder.iteration(self.idx, start, cost, len(plan), 1, state.prompt_tokens_as_decodes)
            for req in finished:
                self._finished(req)

    # ---- what the workers of disaggregated serving add (sim/workers.py) --------------------
    def _planning_point_hook(self) -> simpy.Event | None:
        """Called at every planning point, before the step is prepared; an event returned is
        waited for, and the planning point taken again after it."""
        return None

    def _preempted(self, req: RequestState) -> None:
        self.recorder.preempted(req)

    def _committed(self, plan: tuple[Tile, ...], end_s: float) -> None:
        """Called with every plan executed one by one, once committed."""

    def _enter(self, req: RequestState) -> None:
        """A deferred request is seen by the scheduler (a decode worker's: its KV arrived)."""
        self.state.enqueue(req)

    def deferred_requests(self) -> list[RequestState]:
        """Requests that arrived here and are not yet planned (async scheduling)."""
        return [req for _, req in self._deferred]

    def _planning_point(self, release_all: bool = False) -> None:
        """Async scheduling: one planning point passes for every request waiting to be seen;
        those it was the second for enter the state, all of them when nothing else is planned."""
        idle = release_all or (not self.state.running and not self.state.waiting)
        keep = []
        for left, req in self._deferred:
            if idle or left <= 1:
                self._deferred_tokens -= req.tokens_to_go
                self._enter(req)
            else:
                keep.append((left - 1, req))
        self._deferred = keep

    def _verify_steady_claim(self) -> None:
        """Checked mode: a policy fast-forwarded on its `steady_decode` promise (policies/base.py)
        is asked once, through the same checked path, at the start of each steady run; its plan
        must be exactly one decode tile for every running request, or the promise was broken
        (fast-forwarding it would silently change the results)."""
        state = self.state
        plan = schedule_checked(self.policy, state)
        L = state.num_layers
        want = sorted(decode_tile(r.req_id, r.num_computed_tokens, L) for r in state.running)
        if sorted(plan) != want:
            got = "an empty plan" if not plan else f"{len(plan)} tiles {list(plan)[:3]}"
            raise PlanError(f"policy {guard.policy_label(self.policy)} broke its steady_decode "
                            f"promise: with nothing waiting and every one of the {len(want)} "
                            "running requests decoding, its plan must be exactly one decode tile "
                            f"per running request, got {got}; set steady_decode = False if it "
                            "may do otherwise")

    def _check_invariants(self) -> None:
        """Memory is conserved and within capacity; tokens never exceed what was asked; token
        times never go backwards (the newest gap of each request: older ones were checked when
        they were new, and a policy that rewrites them is caught by schedule_checked)."""
        st = self.state
        memory = st.memory_error()
        if memory is not None:
            self._internal(memory)
        if st.pending_tokens != st.recount_pending_tokens():
            self._internal(f"pending tokens {st.pending_tokens} kept, "
                           f"{st.recount_pending_tokens()} counted")
        for r in st.running:
            too_many = r.num_computed_tokens > r.num_prompt_tokens + r.max_tokens
            if r.num_output_tokens > r.max_tokens or too_many:
                self._internal(f"request {r.req_id}: more tokens than asked")
            if r.itl_s and r.itl_s[-1] < 0:
                self._internal(f"request {r.req_id}: token times go backwards")

    def _internal(self, what: str) -> None:
        """A broken invariant is the simulator's fault, not the user's: one line saying so."""
        raise PlanError(f"internal error on replica {self.idx} with policy "
                        f"{guard.policy_label(self.policy)}: {what}")

    def run_ended(self) -> None:
        """Called when nothing else will ever happen while this replica's policy declines work
        that could run (an empty plan waits for the next arrival, and none is left). A policy
        that finished no request at all here is stuck: an error. One that served requests and
        waits for a partner that never comes (a policy may wait) leaves the rest unfinished,
        counted in the results, with `stall_note` saying why."""
        held = len(self.state.waiting) + len(self.state.running)
        label = guard.policy_label(self.policy)
        if self.num_finished == 0:
            raise PlanError(f"policy {label} finished none of the {held} requests on replica "
                            f"{self.idx}: it returned an empty plan while they could run, until "
                            "no arrival was left to wait for")
        self.stall_note = (f"policy {label} returned an empty plan for the {held} requests left "
                           f"on replica {self.idx} until the run ended")

    def _finished(self, req: RequestState) -> None:
        """A request finished here: recorded (a prefill worker hands it on instead)."""
        self._count_finished()
        self.recorder.finished(req, self.idx)
        if self._on_finish is not None:
            self._on_finish()

    def _count_finished(self) -> None:
        self.outstanding -= 1
        self.num_finished += 1
        if self.on_load is not None:
            self.on_load(self.idx)

    # ---- fast-forward of steady decoding ----------------------------------------------------
    def _steady_decode(self, max_steps: int | None = None):  # type: ignore[no-untyped-def]
        env, state = self.env, self.state
        running = state.running
        k = steady_steps(state)
        if max_steps is not None:  # up to the next planning point (async scheduling)
            k = min(k, max_steps)
        context = np.fromiter((r.num_computed_tokens for r in running), np.int64,
                              len(running))  # [running]: every sum below reads it
        w = self.cost.model.sliding_window
        if w:  # a window's KV read stops growing at w: stop there so every step stays affine
            below = context[context + 1 < w]
            if len(below):
                k = min(k, max(1, w - int(below.max())))
        if k <= 0:  # cannot grow at all: let the normal path preempt or stall
            k = 1
        latencies = self._steady_latencies(context, k) if k > 1 else None
        first_s = last_s = None
        if latencies is not None:
            first_s, last_s = float(latencies[0]), float(latencies[-1])
        c0 = self._price_steady(context, 0, first_s)
        c_last = c0 if k == 1 else self._price_steady(context, k - 1, last_s)
        start = env.now
        priced = latencies is not None
        if latencies is None:  # affine: the two ends give every step
            l0 = c0.latency_s
            slope = (c_last.latency_s - l0) / (k - 1) if k > 1 else 0.0
            latencies = l0 + slope * np.arange(k)  # [k]
        # each step's end as SimPy adds the steps' timeouts one by one (cumsum adds left to
        # right: start, + the first, + the next...), so that an event at a step's end is seen
        # in the same order as stepping would see it
        latencies[0] += start
        ends = np.cumsum(latencies)  # [k]
        last_s = float(ends[k - 1])
        yield self._sleep_until(last_s - start)
        done = k
        if env.now < last_s - 1e-15:  # an arrival: finish the step in flight, then stop
            lo = int(ends.searchsorted(env.now, side="left"))  # the first to end at or after now
            done = lo + 1
            yield env.timeout(max(0.0, float(ends[lo]) - env.now))
        end_s = float(ends[done - 1])
        batch = len(running)
        # the gaps as step-by-step time differences give them (np.diff's, less its overhead)
        gaps = (ends[1:done] - ends[:done - 1]).tobytes()
        finished = state.apply_steady(done, float(ends[0]), gaps, end_s)
        if self.check:
            self._check_invariants()
        self.busy_s += end_s - start
        frac = (done - 1) / (k - 1) if k > 1 else 0.0
        self.recorder.steady(self.idx, start, end_s - start, done, batch, c0, c_last, frac,
                             self.cost.busy_power_w if priced else None)
        for r in finished:
            self._finished(r)

    def _steady_latencies(self, context: np.ndarray, k: int) -> np.ndarray | None:
        """Every step's latency of a steady run of k from the running requests' contexts, where
        the cost model prices them one by one (measured tables; None where two prices give the
        rest)."""
        n = len(context)
        steps = np.arange(k)
        kv = int(context.sum()) + n * (steps + 1)
        w = self.cost.model.sliding_window
        # below the window (k stops before any request reaches it) a request's read grows
        below = int((context + 1 < w).sum()) if w else 0
        kv_win = (int(np.minimum(context + 1, w).sum()) + below * steps if w else kv)
        return self.cost.decode_latencies_s(n, kv, kv_win)

    # ---- fast-forward of prefill stretches (core/stretch.py) ---------------------------------
    def _prefill_stretch(self, plan: tuple[Tile, ...]
                         ) -> tuple[list[RequestState], list[tuple[Tile, ...]]] | None:
        """(decodes, each iteration's prompt tiles) when `plan` is a tile for every running
        decode, in order, plus prompt tiles of running prompts that emit nothing, and the
        policy knows at least one more such iteration; else None (the plan runs alone)."""
        state = self.state
        decodes = state.decodes
        L = state.num_layers
        prompts = plan[len(decodes):]
        if not prompts or any(t[6] for t in prompts):  # a token, or no prompt: not a stretch
            return None
        assert self.prefill_ahead is not None
        ahead = self.prefill_ahead(state, plan)  # cheap checks first: this runs every iteration
        if not ahead:
            return None
        for tile, r in zip(plan, decodes, strict=False):  # each decode's own tile, in order
            if tile[0] != r.req_id or tile[3] or tile[4] != L or tile[2] - tile[1] != 1:
                return None
        running = {r.req_id for r in state.running}
        if any(t[0] not in running or t[2] - t[1] < 1 for t in prompts):
            return None
        steps = [prompts, *ahead]
        k = stretch_steps(state, decodes, steps)
        return (list(decodes), steps[:k]) if k >= 2 else None

    def _run_prefill_stretch(self, decodes: list[RequestState],
                             steps: list[tuple[Tile, ...]]):  # type: ignore[no-untyped-def]
        """Price the stretch's iterations one by one (exact: no interpolation), wait for them
        in one event, stop after the iteration in flight when a request arrives, apply."""
        env, state, cm = self.env, self.state, self.cost
        n = len(decodes)
        contexts = [r.num_computed_tokens for r in decodes]
        kv = sum(contexts) + n
        w = cm.model.sliding_window
        start = t = env.now
        costs: list[IterationCost] = []
        ends: list[float] = []
        for j, tiles in enumerate(steps):
            kv_win = sum(x + j + 1 if x + j < w else w for x in contexts) if w else 0
            cost = cm.price_with_decodes(n, kv + j * n, kv_win, tiles)
            t = t + cost.latency_s  # as SimPy adds each iteration's timeout to its start
            costs.append(cost)
            ends.append(t)
        yield self._sleep_until(t - start)
        done = len(steps)
        if env.now < t - 1e-15:  # an arrival: finish the iteration in flight, then stop
            done = bisect_left(ends, env.now) + 1
            yield env.timeout(max(0.0, ends[done - 1] - env.now))
        finished = apply_stretch(state, decodes, steps[:done], ends[:done])
        end_s = ends[done - 1]
        self.busy_s += end_s - start
        ran = costs[:done]
        self.recorder.iteration_row(
            replica=self.idx, start_s=start, latency_s=end_s - start, iterations=done,
            prefill_tokens=sum(prefill_tokens_once(x) for x in ran), decode_tokens=done * n,
            num_tiles=n + len(steps[0]),
            prefill_layer_tokens=sum(x.prefill_layer_tokens for x in ran),
            energy_j=sum(x.energy_j for x in ran), flops=sum(x.flops for x in ran),
            expert_bytes=sum(x.hbm_bytes.expert_weights for x in ran),
            hbm_bytes=sum(x.hbm_bytes.total for x in ran),
            kv_read_bytes=sum(x.hbm_bytes.kv_read for x in ran))
        for r in finished:
            self._finished(r)

    def _price_steady(self, context: np.ndarray, step: int,
                      latency_s: float | None = None) -> IterationCost:
        """The decode iteration `step` steps ahead of the running requests' contexts, priced
        from its totals (its latency given when _steady_latencies priced it)."""
        n = len(context)
        kv = int(context.sum()) + n * (step + 1)
        w = self.state.cost_model.model.sliding_window if self.state.cost_model else 0
        kv_win = int(np.minimum(context + step + 1, w).sum()) if w else 0
        return self.cost.price_decodes(n, kv, kv_win, latency_s)
