"""Noticing the end of a run that leaves replicas holding work their policies declined.

A declining replica sleeps until an arrival; if none ever comes, SimPy simply runs out of
events. So while any replica declines, one probe follows the event queue, landing after the
last event of each time step; when it finds the queue empty, the run is over and each
declining replica hears of it (Replica.run_ended). One monitor per environment.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING

import simpy

if TYPE_CHECKING:
    from sim.replica import Replica


class _Probe(simpy.events.Event):
    """An event that fires after every other event of its time step: SimPy runs events of equal
    time by priority, URGENT (0) and NORMAL (1) first."""

    def __init__(self, env: simpy.Environment, delay: float) -> None:
        super().__init__(env)
        self._ok = True
        self._value = None
        env.schedule(self, 2, delay)  # type: ignore[arg-type]


class StallMonitor:
    """The module note's monitor, one per environment."""

    _all: weakref.WeakKeyDictionary[simpy.Environment, StallMonitor] = weakref.WeakKeyDictionary()

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self.watched: list[Replica] = []
        self.armed = False

    @classmethod
    def of(cls, env: simpy.Environment) -> StallMonitor:
        mon = cls._all.get(env)
        if mon is None:
            mon = cls._all[env] = cls(env)
        return mon

    def watch(self, replica: Replica) -> None:
        if replica not in self.watched:
            self.watched.append(replica)
        if not self.armed:
            self._arm(0.0)

    def _arm(self, delay: float) -> None:
        self.armed = True
        probe = _Probe(self.env, delay)
        probe.callbacks.append(self._fire)  # type: ignore[union-attr]

    def _fire(self, _: simpy.Event) -> None:
        self.armed = False
        self.watched = [r for r in self.watched if r.declined]
        if not self.watched:
            return
        nxt = self.env.peek()
        if nxt != math.inf:  # something may still wake them: look again after it
            self._arm(nxt - self.env.now)
            return
        stalled, self.watched = self.watched, []
        for r in stalled:
            r.run_ended()
