"""Bare event rates of this machine: the yardstick printed beside every simulator-speed figure.

A figure such as "0.43 s for the default study" says as much about the machine (and what else
ran on it) as about the simulator. Two rates measured in the same run put it in proportion:

- SimPy: events per second of a minimal model, PROCESSES generator processes each looping on
  `yield env.timeout(delay)` (delays differ, so the processes interleave), the kind of event
  the simulator's replicas are made of, with none of the simulator's work.
- heapq: the same schedule without SimPy, a heap of (time, seq, callback) tuples: pop the
  earliest, call it, and it pushes its next one. The fastest a pure-Python event loop gets.

Both count CPU time of this process (time.process_time), not wall time, so other processes'
turns on a shared machine do not count; each runs for SECONDS of CPU after a short warm-up.

    from benchmarks.baseline import event_rates, describe
    rates = event_rates()          # (SimPy events/s, heapq events/s)
    print(describe(rates))         # one line
    print(versus(iterations_per_s, rates))   # a rate in proportion to both

Run alone (python benchmarks/baseline.py) it prints that line.
"""

from __future__ import annotations

import heapq
import itertools
import platform
import time
from collections.abc import Callable, Generator
from typing import Any

PROCESSES = 8  # concurrent processes (the simulator runs one per replica, plus clients)
SECONDS = 0.6  # CPU seconds each rate is measured over
_CHUNK = 20_000  # events between two looks at the clock


def _delays() -> list[float]:
    return [1.0 + k / PROCESSES for k in range(PROCESSES)]


def simpy_rate(seconds: float = SECONDS) -> float:
    """Events per CPU second of PROCESSES SimPy processes that only wait on timeouts."""
    import simpy

    env = simpy.Environment()
    fired = [0]

    def process(delay: float) -> Generator[Any, Any, None]:
        while True:
            yield env.timeout(delay)
            fired[0] += 1

    for delay in _delays():
        env.process(process(delay))
    horizon = _CHUNK / sum(1 / d for d in _delays())  # simulated time for about _CHUNK events
    env.run(until=horizon)  # warm-up
    fired[0] = 0
    start = time.process_time()
    while time.process_time() - start < seconds:
        env.run(until=env.now + horizon)
    return fired[0] / (time.process_time() - start)


def heapq_rate(seconds: float = SECONDS) -> float:
    """Events per CPU second of the same schedule on a bare heap of (time, seq, callback)."""
    heap: list[tuple[float, int, Callable[[float], None]]] = []
    seq = itertools.count()

    def process(delay: float) -> Callable[[float], None]:
        def step(now: float) -> None:
            heapq.heappush(heap, (now + delay, next(seq), step))
        return step

    for delay in _delays():
        heapq.heappush(heap, (delay, next(seq), process(delay)))

    def run(events: int) -> None:
        pop = heapq.heappop
        for _ in range(events):
            now, _, callback = pop(heap)
            callback(now)

    run(_CHUNK)  # warm-up
    fired = 0
    start = time.process_time()
    while time.process_time() - start < seconds:
        run(_CHUNK)
        fired += _CHUNK
    return fired / (time.process_time() - start)


def event_rates(seconds: float = SECONDS) -> tuple[float, float]:
    """(bare SimPy events per CPU second, bare heapq events per CPU second) on this machine."""
    return simpy_rate(seconds), heapq_rate(seconds)


def describe(rates: tuple[float, float]) -> str:
    simpy_per_s, heapq_per_s = rates
    return (f"bare event rates on this machine (CPU time, {PROCESSES} processes): SimPy "
            f"{simpy_per_s / 1e6:.2f} M events/s, heapq {heapq_per_s / 1e6:.2f} M events/s "
            f"(heapq {heapq_per_s / simpy_per_s:.1f}x SimPy)")


def versus(per_s: float, rates: tuple[float, float], what: str = "") -> str:
    """`per_s` as a share of both bare rates, and what one costs in bare SimPy events."""
    simpy_per_s, heapq_per_s = rates
    what = f" {what}" if what else ""
    return (f"{per_s / simpy_per_s:.4f} x bare SimPy, {per_s / heapq_per_s:.4f} x bare heapq; "
            f"one{what} ~ {simpy_per_s / per_s:.0f} bare SimPy events")


if __name__ == "__main__":
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print(describe(event_rates()))
