"""Pareto fronts of the answers: cost against p99 TTFT, and cost against energy per token.

A configuration is on a front when no other is at least as good on both axes and better on
one (both axes minimised). Computed by one sweep: sort by (x, y), keep each point whose y is
below every y kept so far; O(n log n). Points with a missing axis (no price, no capacity) are
on no front. Ties on both axes keep the first in rank order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def front(items: Sequence[T], x: Callable[[T], float | None], y: Callable[[T], float | None]
          ) -> list[T]:
    """The non-dominated items, in increasing x."""
    pts = [(xv, yv, i) for i, it in enumerate(items)
           if (xv := x(it)) is not None and (yv := y(it)) is not None]
    out: list[T] = []
    best_y = float("inf")
    for _, yv, i in sorted(pts):
        if yv < best_y:
            out.append(items[i])
            best_y = yv
    return out
