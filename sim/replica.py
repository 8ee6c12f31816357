"""One serving replica as a SimPy process: core/step.py's serving step on the cost model's clock.

    step = prepare(state, policy, env.now, ...)     # preemptions, then the policy's plan
    cost = cost_model.price(step.plan)
    yield env.timeout(cost.latency_s)
    commit(state, step.plan, env.now)

Runs of steady decodes and prefill stretches are fast-forwarded (sim/fast_forward.py).

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

from collections.abc import Callable
from typing import TYPE_CHECKING

import simpy

from core.records import Recorder
from core.request import RequestState
from core.state import PlanError, ReplicaState
from core.step import STEADY, WAIT, commit, prepare
from costmodel.plan import Tile, decode_tile
from policies import guard
from policies.base import Policy, no_prefill_ahead, schedule_checked
from policies.registry import is_trusted
from sim.fast_forward import (
    next_hop_s,
    prefill_stretch,
    run_prefill_stretch,
    run_with_decodes,
    steady_decode,
)
from sim.stall import StallMonitor

if TYPE_CHECKING:
    from costmodel.price import CostModel


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
        # set by a worker (sim/workers.py) when its next planning point has work that this one
        # could not do: the step planned now runs alone, no run passes that planning point
        self._stop_at_next_point = False
        self.process = env.process(self.run())

    # ---- arrivals ---------------------------------------------------------------------------
    def submit(self, req: RequestState) -> None:
        self._arrive(req, self.state.enqueue)

    def _arrive(self, req: RequestState, take: Callable[[RequestState], object]) -> None:
        """`req` is this replica's: `take` it now, or with async scheduling while an iteration
        is in flight two planning points on (the next iteration is planned already)."""
        if self.async_scheduling and self._in_flight:
            self._deferred.append((2, req))
            self._deferred_tokens += req.tokens_to_go
        else:
            take(req)
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

    def _sleep_until(self, end_s: float) -> simpy.Event:
        """The wake-up event, triggered when the clock reaches `end_s` (exactly: next_hop_s,
        one timer or, rarely, two) unless an arrival (submit) triggers it first: one event
        rather than a condition over two; a stale timer finds it triggered and does nothing.
        (No callback refers to itself: a cycle per run would be left to the collector.)"""
        wake = self._sleep()
        env = self.env

        def ring(_: simpy.Event) -> None:
            if not wake.triggered:
                wake.succeed()

        def hop(_: simpy.Event) -> None:  # past end_s / 2: the difference lands
            if not wake.triggered:
                env.timeout(next_hop_s(env.now, end_s)).callbacks.append(ring)  # type: ignore[union-attr]
        delay = next_hop_s(env.now, end_s)
        timer = env.timeout(delay)
        timer.callbacks.append(ring if env.now + delay == end_s else hop)  # type: ignore[union-attr]
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
            self._stop_at_next_point = False
            step = prepare(state, self.policy, env.now, checked=self.check,
                           on_preempt=self._preempted, replica=self.idx,
                           fast_forward=self.fast_forward, blocked_steady=self.blocked_steady)
            # The load changed since the last report (the last step's tokens and finishes,
            # preemptions, prefix hits) and will not again before this step ends (nor before
            # sleeping: an empty replica's last finish reported).
            if self.on_load is not None:
                self.on_load(self.idx)
            # a run must not pass the next planning point
            deferring = bool(self._deferred) or self._stop_at_next_point
            if step.action is STEADY:
                if self.check:
                    self._verify_steady_claim()
                yield from steady_decode(self, max_steps=1 if deferring else None)
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
                stretch = prefill_stretch(self, plan)
                if stretch is not None:
                    decodes, steps = stretch
                    if len(steps) > 1:
                        yield from run_prefill_stretch(self, decodes, steps)
                    else:
                        yield from run_with_decodes(self, plan, decodes, steps[0])
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
