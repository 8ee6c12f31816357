"""Capacity over two pools: the fewest GPUs that meet the SLO at a total rate as a prefill pool
and a decode pool (sim/disagg.py), and how to split them.

Assumption, as min_gpus's bisection on a replica count makes it: a worker added to either pool
never lowers the attainment. The splits (p prefill, d decode workers) that meet the target are
then an up-set, and the cheapest lie on its lower staircase: d(p), the fewest decode workers
that meet with p prefill workers, does not grow with p. Within a budget of GPUs the walk goes
p = 1, 2, ...:

- no split has met yet: d(p) by doubling d from 1 (to what the budget leaves), then bisection;
- one has: d(p) <= d(p-1), and a corner of the staircase needs fewer, so downwards from
  d(p-1) - 1 (and no more GPUs than the best split so far), by galloping steps (1, 2, 4, ...),
  then bisection;
- stop when p prefill workers and one decode worker already have more GPUs than that best (or
  than the budget).

Every split of the fewest GPUs that meets is a corner of the staircase, so the walk tries it;
of them the answer is the one with the highest attainment (fewer prefill workers on a tie).
The budget starts at one worker of each and doubles, up to `max_gpus`, while no split meets
(a verdict is never simulated twice), so no simulation is of more than twice the GPUs the
answer needs. About p_max + log2(d) simulations per budget, against every split of every size
up to the answer's when they are tried in order of GPUs.

Seeds: each split tried runs on every seed (independent arrivals and lengths); it meets when the
lower end of the Student-t interval over its per-seed attainments (sim/capacity.py's
t_interval, at `confidence`) reaches the target, which with one seed is its attainment. Its
attainment for the tie-break is their mean; of its metrics, the numeric ones are means over
seeds (None where a seed has none) and the others the first seed's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from typing import Any

from costmodel.errors import ConfigError
from sim.capacity import CapacityAnswer, Point, check_target, replace_study, t_interval
from sim.run import run_study
from sim.study import Study

MAX_SPLIT_GPUS = 64  # the walk's limit on a split's GPUs
Split = tuple[int, int]  # (prefill workers, decode workers)
SplitEvaluate = Callable[[float, int, int, int], dict[str, Any]]  # (rate, p, d, seed) -> metrics


def split_steps(gpus_per_prefill: int, gpus_per_decode: int, max_gpus: int = MAX_SPLIT_GPUS
                ) -> Generator[Split, tuple[bool, float], Split | None]:
    """The walk of the module note as a coroutine: yields each split to try, is sent (meets,
    attainment) for it, and returns the answer (None: no split within max_gpus met)."""
    gp, gd = gpus_per_prefill, gpus_per_decode
    if gp < 1 or gd < 1:
        raise ConfigError(f"a worker needs at least one GPU, got {gp} (prefill) and {gd} (decode)")
    tried: dict[Split, tuple[bool, float]] = {}
    budget = gp + gd
    while True:
        budget = min(budget, max_gpus)
        best = yield from _staircase(gp, gd, budget, tried)
        if best is not None or budget >= max_gpus:
            return best
        budget *= 2


def _staircase(gp: int, gd: int, budget: int, tried: dict[Split, tuple[bool, float]]
               ) -> Generator[Split, tuple[bool, float], Split | None]:
    """The staircase walk within `budget` GPUs; `tried` keeps every verdict across budgets."""
    best: tuple[int, float, int, int] | None = None  # (GPUs, -attainment, p, d)

    def verdict(p: int, d: int) -> Generator[Split, tuple[bool, float], bool]:
        if (p, d) not in tried:
            tried[(p, d)] = yield (p, d)
        return tried[(p, d)][0]

    fewest_decode: int | None = None  # d(q) of the last q < p where one met
    p = 1
    while True:
        cap = ((budget if best is None else best[0]) - p * gp) // gd
        if fewest_decode is not None:  # as many as d(p - 1) would make no corner
            cap = min(cap, fewest_decode - 1)
        if cap < 1:
            return None if best is None else (best[2], best[3])
        lo, hi = 0, None  # most decode workers known to miss, fewest known to meet
        if fewest_decode is None:
            d = 1
            while hi is None:
                if (yield from verdict(p, d)):
                    hi = d
                elif d >= cap:
                    break
                else:
                    lo, d = d, min(2 * d, cap)
        elif (yield from verdict(p, cap)):
            hi, step = cap, 1
            while hi - step > lo:
                if (yield from verdict(p, hi - step)):
                    hi, step = hi - step, 2 * step
                else:
                    lo = hi - step
        else:
            lo = cap
        if hi is not None:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if (yield from verdict(p, mid)):
                    hi = mid
                else:
                    lo = mid
            found = (p * gp + hi * gd, -tried[(p, hi)][1], p, hi)
            if best is None or found[:2] < best[:2]:
                best = found
            fewest_decode = hi
        p += 1


def split_probes(gpus_per_prefill: int, gpus_per_decode: int, rate: float, seeds: Sequence[int],
                 target: float, points: list[Point], confidence: float = 0.9,
                 max_gpus: int = MAX_SPLIT_GPUS) -> Generator[tuple[int, int, int], dict[str, Any],
                                                              Split | None]:
    """The walk over seeds at total `rate`: yields (p, d, seed) for every simulation, is sent
    its metrics, appends each split's point to `points` once its seeds are in, and returns the
    answer."""
    if not seeds:
        raise ConfigError("--seeds must be at least 1")
    steps = split_steps(gpus_per_prefill, gpus_per_decode, max_gpus)
    try:
        p, d = next(steps)
        while True:
            runs = []
            for seed in seeds:
                runs.append((yield (p, d, seed)))
            point = _aggregate(runs, rate, (p, d), target, confidence)
            points.append(point)
            p, d = steps.send((point.meets, point.slo_attainment))
    except StopIteration as stop:
        answer: Split | None = stop.value
        return answer


def _aggregate(runs: list[dict[str, Any]], rate: float, split: Split, target: float,
               confidence: float) -> Point:
    """One split over its seeds: one seed's metrics as they are, several seeds' means (a run
    that could not be simulated has no attainment: 0)."""
    if len(runs) == 1:
        att = runs[0].get("slo_attainment") or 0.0
        return Point(rate, sum(split), att, att >= target, runs[0], split)
    interval = t_interval([r.get("slo_attainment") or 0.0 for r in runs], confidence)
    metrics: dict[str, Any] = {}
    for key, value in runs[0].items():
        vals = [r.get(key) for r in runs]
        nums = [float(v) for v in vals if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(nums) == len(vals) and not isinstance(value, bool):
            mean = math.fsum(nums) / len(nums)
            metrics[key] = int(mean) if isinstance(value, int) and mean == int(mean) else mean
        else:
            metrics[key] = None if any(v is None for v in vals) else value
    metrics |= {"slo_attainment": interval.mean, "slo_attainment_low": interval.low,
                "per_seed_slo_attainment": list(interval.values)}
    return Point(rate, sum(split), interval.mean, interval.low >= target, metrics, split)


def split_evaluator(study: Study) -> SplitEvaluate:
    def evaluate(rate: float, prefill: int, decode: int, seed: int) -> dict[str, Any]:
        _, _, (result,) = run_study(replace_study(study, rate=rate, prefill_replicas=prefill,
                                                  decode_replicas=decode, split_pools=False,
                                                  seed=seed))
        return result.metrics
    return evaluate


def cheapest_split(evaluate: SplitEvaluate, rate: float, target: float, gpus_per_prefill: int,
                   gpus_per_decode: int, max_gpus: int = MAX_SPLIT_GPUS,
                   seeds: Sequence[int] = (0,), confidence: float = 0.9,
                   on_point: Callable[[Point], None] | None = None) -> CapacityAnswer:
    """The walk of the module note at total `rate`, simulated by `evaluate`."""
    check_target(target)
    points: list[Point] = []
    walk = split_probes(gpus_per_prefill, gpus_per_decode, rate, seeds, target, points,
                        confidence, max_gpus)
    shown = 0
    try:
        p, d, seed = next(walk)
        while True:
            metrics = evaluate(rate, p, d, seed)
            p, d, seed = walk.send(metrics)
            shown = _show(points, shown, on_point)
    except StopIteration as stop:
        answer = stop.value
    _show(points, shown, on_point)
    best = next((pt for pt in points if pt.split == answer), None)
    return CapacityAnswer("min-gpus-split", best, tuple(points), target, None)


def _show(points: list[Point], shown: int, on_point: Callable[[Point], None] | None) -> int:
    """Show the points the walk finished since the last call; how many are shown now."""
    if on_point:
        for pt in points[shown:]:
            on_point(pt)
    return len(points)
