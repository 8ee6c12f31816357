"""The two kinds of worker of disaggregated serving (sim/disagg.py): replicas (sim/replica.py)
that hand a request's KV on, and replicas that take it in; and the links between them.

A prefill worker keeps each finished request's KV (core/handoff.py) and hands the request to
the run instead of recording it; with a `stream` it also hands on every executed plan, whose
tiles' KV then leaves at once, and it runs no prefill stretches (they commit several iterations
at once). A decode worker takes incoming KV at its planning points only, in order: blocks and
a sequence slot reserved (`reserve`) and an arrived request joining the running ones
(`receive`; with async scheduling, one planning point later when an iteration was in flight, as
an arrival joins a replica). Between planning points an iteration or a fast-forwarded run holds blocks counted
when it was planned, so nothing may take them meanwhile; an incoming request ends a run after
the iteration in flight, as an arrival does.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import simpy

from core.handoff import cancel_incoming, reserve_incoming, start_decoding
from core.request import RequestState
from costmodel.plan import Tile
from sim.replica import Replica


class PrefillWorker(Replica):
    def __init__(self, *args: Any, hand_off: Callable[[PrefillWorker, RequestState], None],
                 stream: Callable[[PrefillWorker, tuple[Tile, ...], float], None] | None = None,
                 cancel: Callable[[RequestState], None] | None = None,
                 unreserved: Callable[[PrefillWorker], bool] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state.keep_finished_kv = True
        self.hand_off = hand_off
        self.stream = stream
        self.cancel = cancel
        self.unreserved = unreserved  # whether some KV sent from here has no decode blocks yet
        if stream is not None:
            self.prefill_ahead = None

    def _planning_point_hook(self) -> simpy.Event | None:
        # a part-way prompt that streams holds decode blocks: a transfer still waiting for
        # decode blocks may wait on those very blocks, so preempt rather than wait for it
        if self.unreserved is not None:
            self.state.transit_may_wait_on_streams = self.unreserved(self)
        return None

    def _preempted(self, req: RequestState) -> None:
        super()._preempted(req)
        if self.cancel is not None:  # what it streamed so far is void: it restarts
            self.cancel(req)

    def _finished(self, req: RequestState) -> None:
        self._count_finished()
        self.hand_off(self, req)

    def _committed(self, plan: tuple[Tile, ...], end_s: float) -> None:
        if self.stream is not None:
            self.stream(self, plan, end_s)


class DecodeWorker(Replica):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._received: list[RequestState] = []  # KV arrived, not yet running
        self._settled = False  # this planning point waited for its instant's other events
        self._reservations: list[tuple[RequestState, simpy.Event]] = []  # KV yet to get blocks

    def reserve(self, req: RequestState) -> simpy.Event:
        """Blocks and a sequence slot for `req`'s incoming KV, taken in order at a planning
        point; the event fires once they are."""
        taken = self.env.event()
        self._reservations.append((req, taken))
        self.wake()
        return taken

    def receive(self, req: RequestState) -> None:
        """`req`'s KV has arrived: it joins the running requests at the next planning point, or
        with async scheduling while an iteration is in flight at the one after (as an arrival
        does: sim/replica.py)."""
        self._arrive(req, self._received.append)

    def _planning_point_hook(self) -> simpy.Event | None:
        if not self._settled:  # first let whatever else happens at this instant happen (a
            self._settled = True  # first token handed on), as both executors then see it
            return self.env.timeout(0)
        self._settled = False
        for req in self._received:
            start_decoding(self.state, req)
        self._received.clear()
        limit = getattr(self.policy, "max_num_seqs", None)
        queue = self._reservations
        while queue and reserve_incoming(self.state, queue[0][0],
                                         limit if isinstance(limit, int) else None):
            queue.pop(0)[1].succeed(True)
        return None

    def _enter(self, req: RequestState) -> None:
        start_decoding(self.state, req)

    def _preempted(self, req: RequestState) -> None:
        super()._preempted(req)
        if self._reservations:  # its blocks, freed after this planning point tried the queue,
            self._stop_at_next_point = True  # are the next one's to give: no run passes it

    def withdraw(self, req: RequestState) -> None:
        """A reservation asked for and no longer wanted (its stream was cancelled): its event
        fires with False if it was still waiting, and blocks it took are freed."""
        for i, (waiting, taken) in enumerate(self._reservations):
            if waiting is req:
                del self._reservations[i]
                taken.succeed(False)
                return
        cancel_incoming(self.state, req)
        self.wake()  # the blocks freed may be what the reservations queued here wait for


@dataclass
class _Waiting:
    sender: Hashable
    receiver: Hashable
    granted: simpy.Event
    passed: int = 0  # later transfers that took one of its links first


class Links:
    """The KV links of a disaggregated run: a transfer takes its sender's link and its
    receiver's together, once both are free, and holds neither while it waits. Waiting
    transfers are granted in the order they asked, each as soon as both its links are free, so
    one that waits for a busy receiver lets a later one from the same sender to an idle
    receiver go first (no head-of-line blocking); the pieces of one stream, on the same two
    links, keep their order. One passed `max_passed` times on its links reserves them (no later
    transfer takes them), so none waits for ever behind later ones that each need only one of
    its links."""

    def __init__(self, env: simpy.Environment, max_passed: int = 8) -> None:
        self.env = env
        self.max_passed = max_passed
        self.busy: set[Hashable] = set()
        self.waiting: list[_Waiting] = []

    def take(self, sender: Hashable, receiver: Hashable) -> simpy.Event:
        """An event that fires once both links are this transfer's; `release` it after."""
        granted = self.env.event()
        self.waiting.append(_Waiting(sender, receiver, granted))
        self._grant()
        return granted

    def release(self, sender: Hashable, receiver: Hashable, granted: simpy.Event) -> None:
        """The transfer is over: its links back if it had them, else its place in the queue
        (a transfer given up while it waited)."""
        if granted.triggered:
            self.busy.discard(sender)
            self.busy.discard(receiver)
        else:
            self.waiting = [w for w in self.waiting if w.granted is not granted]
        self._grant()

    def _grant(self) -> None:
        still: list[_Waiting] = []
        reserved: set[Hashable] = set()
        for w in self.waiting:
            links = {w.sender, w.receiver}
            if links & self.busy or links & reserved:
                still.append(w)
                if w.passed >= self.max_passed:
                    reserved |= links
                continue
            for earlier in still:  # it passes those waiting on one of its links
                if links & {earlier.sender, earlier.receiver}:
                    earlier.passed += 1
            self.busy |= links
            w.granted.succeed()
        self.waiting = still
