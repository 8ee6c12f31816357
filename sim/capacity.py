"""Capacity planning: the highest rate one replica sustains within the SLO, or the fewest GPUs
for a given rate.

Each point of the search is a full simulation with the same seed (common random numbers keep
the attainment curve close to monotone). Rate search: double from a start rate until the SLO
attainment falls below the target, then bisect between the last passing and the first failing
rate until they are within `rel_tol`. GPU search: at total rate R, double the replica count
until it passes, then bisect on the count. The answer carries the energy per token and, given a
price per GPU-hour, the cost per million tokens (prompt + output) at that operating point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from costmodel.errors import ConfigError
from sim.study import Study, run_study


@dataclass(frozen=True)
class Point:
    rate: float
    replicas: int
    slo_attainment: float
    meets: bool
    metrics: dict[str, Any] = field(repr=False)

    def row(self) -> dict[str, Any]:
        m = self.metrics
        return {"rate": self.rate, "replicas": self.replicas, "gpus": m["gpus"],
                "slo_attainment": self.slo_attainment, "meets": self.meets,
                "mean_ttft_ms": m["mean_ttft_ms"], "p99_itl_ms": m["p99_itl_ms"],
                "energy_per_token_j": m["energy_per_token_j"]}


@dataclass(frozen=True)
class CapacityAnswer:
    kind: str  # "max-rate" | "min-gpus"
    point: Point | None
    search: tuple[Point, ...]
    target: float
    price_per_gpu_hour: float | None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "target": self.target, "found": self.point is not None}
        if self.point is None:
            return out
        m = self.point.metrics
        out |= {"rate": self.point.rate, "replicas": self.point.replicas, "gpus": m["gpus"],
                "rate_per_replica": self.point.rate / self.point.replicas,
                "slo_attainment": self.point.slo_attainment,
                "energy_per_token_j": m["energy_per_token_j"]}
        if self.price_per_gpu_hour is not None and m["total_token_throughput"]:
            tokens_per_hour = m["total_token_throughput"] * 3600
            out["cost_per_million_tokens"] = m["gpus"] * self.price_per_gpu_hour / tokens_per_hour * 1e6
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.summary(), "search": [p.row() for p in self.search]}


Evaluate = Callable[[float, int], dict[str, Any]]  # (total rate, replicas) -> metrics


def study_evaluator(study: Study) -> Evaluate:
    def evaluate(rate: float, replicas: int) -> dict[str, Any]:
        _, _, (result,) = run_study(replace_study(study, rate=rate, replicas=replicas))
        return result.metrics
    return evaluate


def _point(evaluate: Evaluate, rate: float, replicas: int, target: float) -> Point:
    metrics = evaluate(rate, replicas)
    att = metrics["slo_attainment"] or 0.0
    return Point(rate, replicas, att, att >= target, metrics)


def replace_study(study: Study, **changes: Any) -> Study:
    return study.model_copy(update=changes)


def max_rate(evaluate: Evaluate, target: float = 0.9, start_rate: float = 0.5,
             rel_tol: float = 0.02, max_points: int = 30,
             on_point: Callable[[Point], None] | None = None) -> CapacityAnswer:
    _check_target(target)
    search: list[Point] = []

    def probe(rate: float) -> Point:
        p = _point(evaluate, rate, 1, target)
        search.append(p)
        if on_point:
            on_point(p)
        return p

    good: Point | None = None
    bad: Point | None = None
    rate = start_rate
    while len(search) < max_points:  # bracket
        p = probe(rate)
        if p.meets:
            good, rate = p, rate * 2
            if bad is not None:  # bracketed from above already: bisect, never re-probe
                break
        else:
            bad = p
            if good is not None:
                break
            rate /= 2
            if rate < start_rate / 1024:
                break
    while good is not None and bad is not None and len(search) < max_points:
        if (bad.rate - good.rate) / bad.rate <= rel_tol:
            break
        p = probe((good.rate + bad.rate) / 2)
        good, bad = (p, bad) if p.meets else (good, p)
    return CapacityAnswer("max-rate", good, tuple(search), target, None)


def min_gpus(evaluate: Evaluate, rate: float, target: float = 0.9, max_replicas: int = 4096,
             on_point: Callable[[Point], None] | None = None) -> CapacityAnswer:
    _check_target(target)
    search: list[Point] = []

    def probe(n: int) -> Point:
        p = _point(evaluate, rate, n, target)
        search.append(p)
        if on_point:
            on_point(p)
        return p

    lo, n = 0, 1  # lo: most replicas known to fail
    hit: Point | None = None
    while n <= max_replicas:
        p = probe(n)
        if p.meets:
            hit = p
            break
        lo, n = n, n * 2
    if hit is None:
        return CapacityAnswer("min-gpus", None, tuple(search), target, None)
    hi = hit.replicas
    while hi - lo > 1:
        mid = (lo + hi) // 2
        p = probe(mid)
        if p.meets:
            hi, hit = mid, p
        else:
            lo = mid
    return CapacityAnswer("min-gpus", hit, tuple(search), target, None)


def with_price(answer: CapacityAnswer, price_per_gpu_hour: float | None) -> CapacityAnswer:
    return replace(answer, price_per_gpu_hour=price_per_gpu_hour)


def _check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise ConfigError(f"--target must be in (0, 1], got {target}")
