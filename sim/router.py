"""Routers spread arrivals over data-parallel replicas.

round-robin: in turn. least-outstanding: fewest requests routed and not finished.
jsq-tokens: join the shortest queue measured in tokens still to compute (prompt + output).
power-of-two: two replicas drawn at random, the one with fewer outstanding requests.
Ties go to the lowest index, and the random draws come from the run's seed: deterministic.

The two load-ordered routers answer in O(log n) per arrival, not by scanning the fleet: a heap
holds (load, index) entries, and each replica reports when its load may have changed
(`changed`, the replica's `on_load`). Before a pick, every replica reported since the last one
gets an entry with its load now; entries whose load is no longer the replica's are dropped as
they reach the top. So the top valid entry is the smallest (load, index) over all replicas:
exactly the scan's answer. The heap is rebuilt whenever stale entries outnumber replicas 4 to 1.
"""

from __future__ import annotations

import heapq
import numbers
from collections.abc import Sequence
from operator import attrgetter
from typing import Protocol

import numpy as np

from costmodel.errors import ConfigError
from traces._checks import shown


class Loaded(Protocol):
    """What a router reads of a replica (read-only: core keeps pending_tokens)."""

    @property
    def outstanding(self) -> int: ...

    @property
    def pending_tokens(self) -> int: ...


class Router:
    name = "round-robin"
    ordered = False  # keeps replicas ordered by load, and must hear of every change (`changed`)

    def __init__(self, seed: int = 0) -> None:
        self._next = 0
        self._rng = np.random.default_rng(seed)

    def pick(self, replicas: Sequence[Loaded]) -> int:
        i = self._next % len(replicas)
        self._next += 1
        return i

    def changed(self, idx: int) -> None:
        """Replica `idx`'s load may have changed (heard only by an `ordered` router)."""


class _LeastLoad(Router):
    """The replica with the smallest `load`, ties to the lowest index (see the module note)."""

    ordered = True
    load = attrgetter("outstanding")

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._heap: list[tuple[int, int]] | None = None
        self._changed: set[int] = set()

    def changed(self, idx: int) -> None:
        self._changed.add(idx)

    def pick(self, replicas: Sequence[Loaded]) -> int:
        load = self.load
        heap = self._heap
        if heap is None or len(heap) > 4 * len(replicas):
            heap = self._heap = [(load(r), i) for i, r in enumerate(replicas)]
            heapq.heapify(heap)
        else:
            for i in self._changed:
                heapq.heappush(heap, (load(replicas[i]), i))
        self._changed.clear()
        while True:
            value, i = heap[0]
            if value == load(replicas[i]):
                return i
            heapq.heappop(heap)  # stale: the replica's load moved on since


class LeastOutstanding(_LeastLoad):
    name = "least-outstanding"


class ShortestTokenQueue(_LeastLoad):
    name = "jsq-tokens"
    load = attrgetter("pending_tokens")


class PowerOfTwo(Router):
    name = "power-of-two"

    def pick(self, replicas: Sequence[Loaded]) -> int:
        n = len(replicas)
        if n == 1:
            return 0
        a, b = (int(x) for x in self._rng.choice(n, size=2, replace=False))
        return a if (replicas[a].outstanding, a) <= (replicas[b].outstanding, b) else b


ROUTERS: dict[str, type[Router]] = {r.name: r for r in (Router, LeastOutstanding,
                                                         ShortestTokenQueue, PowerOfTwo)}


def make_router(name: str, seed: int = 0) -> Router:
    if not isinstance(name, str) or name not in ROUTERS:
        raise ConfigError(f"unknown router {shown(name)} (choose from {', '.join(ROUTERS)})")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:  # numpy's own rule
        raise ConfigError(f"seed must be a non-negative integer, got {shown(seed)}")
    return ROUTERS[name](seed)
