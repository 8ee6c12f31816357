"""Routers spread arrivals over data-parallel replicas.

round-robin: in turn. least-outstanding: fewest requests routed and not finished.
jsq-tokens: join the shortest queue measured in tokens still to compute (prompt + output).
power-of-two: two replicas drawn at random, the one with fewer outstanding requests.
Ties go to the lowest index, and the random draws come from the run's seed: deterministic.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from costmodel.errors import ConfigError
from traces._checks import shown


class Loaded(Protocol):
    """What a router reads of a replica (read-only: a replica computes pending_tokens)."""

    @property
    def outstanding(self) -> int: ...

    @property
    def pending_tokens(self) -> int: ...


class Router:
    name = "round-robin"

    def __init__(self, seed: int = 0) -> None:
        self._next = 0
        self._rng = np.random.default_rng(seed)

    def pick(self, replicas: Sequence[Loaded]) -> int:
        i = self._next % len(replicas)
        self._next += 1
        return i


class LeastOutstanding(Router):
    name = "least-outstanding"

    def pick(self, replicas: Sequence[Loaded]) -> int:
        return min(range(len(replicas)), key=lambda i: replicas[i].outstanding)


class ShortestTokenQueue(Router):
    name = "jsq-tokens"

    def pick(self, replicas: Sequence[Loaded]) -> int:
        return min(range(len(replicas)), key=lambda i: replicas[i].pending_tokens)


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
