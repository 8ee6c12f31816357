"""Synthetic arrival processes: Poisson, Gamma-renewal and fixed-rate.

Each returns a float64 numpy array of arrival times in seconds, non-decreasing.

* ``poisson``: i.i.d. exponential inter-arrivals with mean ``1/rate``; the first arrival is the
  first inter-arrival (not 0).
* ``gamma``: i.i.d. Gamma inter-arrivals with shape ``k = 1/cv**2`` and scale ``1/(rate*k)``, so
  the mean is ``1/rate`` and the coefficient of variation is ``cv`` (cv < 1 smoother, cv > 1
  burstier); the first arrival is the first inter-arrival. ``cv == 1`` delegates to ``poisson``
  and yields exactly the same times for the same generator state.
* ``fixed``: deterministic times ``i / rate`` for i = 0, 1, ...; the first arrival is at 0.
* ``rate = inf`` (vLLM's ``--request-rate inf``), whatever the process: every arrival at 0, all
  at once; it needs ``n``, since no duration caps an instant.

Caps: ``n`` (number of arrivals) and/or ``duration_s`` (keep arrivals with ``t < duration_s``);
at least one is required, both means whichever is reached first. Randomness comes only from the
``numpy.random.Generator`` passed in (``fixed`` ignores it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from traces.errors import TraceError

ARRIVAL_KINDS = ("poisson", "gamma", "fixed")


def _check_rate(rate: float) -> None:
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise TraceError(f"arrival rate must be a positive finite number, got {rate!r}")


def _check_caps(n: int | None, duration_s: float | None) -> None:
    if n is None and duration_s is None:
        raise TraceError("arrivals need a cap: give n and/or duration_s")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise TraceError(f"n must be a non-negative integer, got {n!r}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise TraceError(f"duration_s must be a positive finite number, got {duration_s!r}")


def _renewal(
    draw: Callable[[int], np.ndarray], rate: float, n: int | None, duration_s: float | None
) -> np.ndarray:
    """Cumulate inter-arrival draws (chunked) until ``n`` arrivals or time ``duration_s``."""
    if n is not None and duration_s is None:
        return np.cumsum(draw(n))
    assert duration_s is not None
    expected = rate * duration_s
    chunk = int(expected + 5.0 * math.sqrt(expected) + 16)
    if n is not None:
        chunk = min(chunk, n)
    parts: list[np.ndarray] = []
    total = 0
    last = 0.0
    while last < duration_s and (n is None or total < n):
        size = chunk if n is None else min(chunk, n - total)
        if size == 0:
            break
        times = last + np.cumsum(draw(size))
        parts.append(times)
        total += size
        last = float(times[-1])
    out = np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)
    out = out[out < duration_s]
    return out if n is None else out[:n]


def poisson(
    rate: float, rng: np.random.Generator, *, n: int | None = None,
    duration_s: float | None = None,
) -> np.ndarray:
    """Poisson arrivals at ``rate`` req/s; the first arrival is one exponential gap after 0."""
    _check_rate(rate)
    _check_caps(n, duration_s)
    return _renewal(lambda k: rng.exponential(1.0 / rate, size=k), rate, n, duration_s)


def gamma(
    rate: float, cv: float, rng: np.random.Generator, *, n: int | None = None,
    duration_s: float | None = None,
) -> np.ndarray:
    """Gamma-renewal arrivals with mean rate ``rate`` and inter-arrival CV ``cv``."""
    _check_rate(rate)
    if not (isinstance(cv, (int, float)) and math.isfinite(cv) and cv > 0):
        raise TraceError(f"cv must be a positive finite number, got {cv!r}")
    if cv == 1.0:
        return poisson(rate, rng, n=n, duration_s=duration_s)
    _check_caps(n, duration_s)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    return _renewal(lambda k: rng.gamma(shape, scale, size=k), rate, n, duration_s)


def fixed(
    rate: float, rng: np.random.Generator | None = None, *, n: int | None = None,
    duration_s: float | None = None,
) -> np.ndarray:
    """Evenly spaced arrivals ``i / rate`` starting at 0; ``rng`` is accepted and unused."""
    _check_rate(rate)
    _check_caps(n, duration_s)
    count = n if n is not None else math.inf
    if duration_s is not None:
        count = min(count, math.ceil(duration_s * rate))
    times = np.arange(int(count), dtype=np.float64) / rate
    if duration_s is not None:
        times = times[times < duration_s]
    return times


def all_at_once(n: int | None, duration_s: float | None = None) -> np.ndarray:
    """``n`` arrivals at time 0: vLLM's ``--request-rate inf``."""
    if n is None:
        raise TraceError("rate inf sends every request at once: give num_requests "
                         "(a duration caps nothing at one instant)")
    _check_caps(n, duration_s)
    return np.zeros(n, dtype=np.float64)


def generate_arrivals(
    kind: str, rate: float, rng: np.random.Generator, *, cv: float = 1.0,
    n: int | None = None, duration_s: float | None = None,
) -> np.ndarray:
    """Dispatch on ``kind`` ('poisson' | 'gamma' | 'fixed'); ``rate = inf`` is all at once."""
    if kind in ARRIVAL_KINDS and isinstance(rate, (int, float)) and rate == math.inf:
        return all_at_once(n, duration_s)
    if kind == "poisson":
        return poisson(rate, rng, n=n, duration_s=duration_s)
    if kind == "gamma":
        return gamma(rate, cv, rng, n=n, duration_s=duration_s)
    if kind == "fixed":
        return fixed(rate, rng, n=n, duration_s=duration_s)
    raise TraceError(f"unknown arrival process {kind!r}; valid: {', '.join(ARRIVAL_KINDS)}")


def describe_arrivals(kind: str, rate: float, cv: float = 1.0) -> str:
    """One phrase such as 'Poisson 1.3 req/s', 'Gamma (CV 2) 4 req/s' or, for rate inf,
    'all at once (rate inf)'."""
    if rate == math.inf:
        return "all at once (rate inf)"
    if kind == "gamma" and cv != 1.0:
        return f"Gamma (CV {cv:g}) {rate:g} req/s"
    if kind == "fixed":
        return f"fixed-interval {rate:g} req/s"
    return f"Poisson {rate:g} req/s"
