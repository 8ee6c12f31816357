"""Capacity planning: the highest rate one replica sustains within the SLO, or the fewest GPUs
for a given rate.

Each point of the search is a full simulation with the same seed (common random numbers keep
the attainment curve close to monotone). Rate search: double from a start rate until the SLO
attainment falls below the target, then bisect between the last passing and the first failing
rate until they are within `rel_tol`. GPU search: at total rate R, double the replica count
until it passes, then bisect on the count. The answer carries the energy per token and, given a
price per GPU-hour, the cost per million tokens (prompt + output) at that operating point.

Split search (`split_pools`, with a rate): the fewest GPUs as a prefill and a decode pool
(sim/disagg.py) that meet the target, and the split: sim/split.py.

Confidence interval over seeds (`--seeds K`): the search above runs once per seed, seeds
seed, seed+1, ..., seed+K-1 (independent arrival and length draws), giving K capacities c_j
(highest rate per replica, or fewest replicas). The answer is their mean with a two-sided
Student-t interval at `confidence` (default 90%): mean -/+ t((1+confidence)/2, K-1) * s / sqrt(K),
s the sample standard deviation; a seed whose search found no passing rate counts as capacity 0.
The conservative end is the interval's lower end for a rate and its upper end, rounded up, for a
replica count; cost per million tokens is priced there. The interval covers the seed-to-seed
spread of the workload draw, not the search's own resolution (`rel_tol`). With K = 1 there is
no interval: the answer is the single search's, as without --seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any

from costmodel.errors import ConfigError
from sim.run import run_study
from sim.study import Study
from traces.workload import MAX_RATE


@dataclass(frozen=True)
class Point:
    rate: float
    replicas: int
    slo_attainment: float
    meets: bool
    metrics: dict[str, Any] = field(repr=False)
    split: tuple[int, int] | None = None  # (prefill, decode) workers of a disaggregated point

    def row(self) -> dict[str, Any]:
        m = self.metrics
        pools = {} if self.split is None else {"prefill_replicas": self.split[0],
                                               "decode_replicas": self.split[1]}
        return {"rate": self.rate, "replicas": self.replicas, **pools, "gpus": m["gpus"],
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
        if self.point.split is not None:  # workers of two sizes: no rate per replica
            out |= {"prefill_replicas": self.point.split[0], "decode_replicas": self.point.split[1]}
            out |= {k: m[k] for k in ("slo_attainment_low", "per_seed_slo_attainment") if k in m}
        else:
            out |= {"replicas": self.point.replicas,
                    "rate_per_replica": self.point.rate / self.point.replicas}
        out |= {"rate": self.point.rate, "gpus": m["gpus"],
                "slo_attainment": self.point.slo_attainment,
                "energy_per_token_j": m["energy_per_token_j"]}
        if self.price_per_gpu_hour is not None:  # at the rate served, not the run's throughput
            cost = cost_per_million_tokens(m["gpus"], self.price_per_gpu_hour, self.point.rate,
                                           tokens_per_request(m))  # (its drain dilutes that)
            if cost is not None:
                out["cost_per_million_tokens"] = cost
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.summary(), "search": [p.row() for p in self.search]}


Evaluate = Callable[[float, int], dict[str, Any]]  # (total rate, replicas) -> metrics


def study_evaluator(study: Study) -> Evaluate:
    study.refuse_disaggregated("capacity")
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


def rate_steps(start_rate: float = 0.5, rel_tol: float = 0.02, max_points: int = 30,
               highest_rate: float = MAX_RATE) -> Generator[float, bool, float | None]:
    """The rate search of the module note as a coroutine: yields each rate to probe, is sent
    whether that rate met the target, and returns the highest rate that met it (None: none did).
    Doubling stops at `highest_rate` (the fastest arrivals a workload may have): a rate that
    meets there is the answer. Driving it needs no simulator, so that `max_rate` here and the
    search over many configurations (search/runner.py) share one algorithm."""
    count = 0
    good: float | None = None
    bad: float | None = None
    rate = start_rate
    while count < max_points:  # bracket
        meets = yield rate
        count += 1
        if meets:
            good, rate = rate, min(rate * 2, highest_rate)
            if bad is not None or good >= highest_rate:  # bracketed, or nothing faster to try
                break
        else:
            bad = rate
            if good is not None:
                break
            rate /= 2
            if rate < start_rate / 1024:
                break
    while good is not None and bad is not None and count < max_points:
        if (bad - good) / bad <= rel_tol:
            break
        mid = (good + bad) / 2
        meets = yield mid
        count += 1
        good, bad = (mid, bad) if meets else (good, mid)
    return good


def max_rate(evaluate: Evaluate, target: float = 0.9, start_rate: float = 0.5,
             rel_tol: float = 0.02, max_points: int = 30,
             on_point: Callable[[Point], None] | None = None) -> CapacityAnswer:
    check_target(target)
    search: list[Point] = []
    good: Point | None = None  # every passing point replaces the last one: it is the answer
    steps = rate_steps(start_rate, rel_tol, max_points)
    try:
        rate = next(steps)
        while True:
            p = _point(evaluate, rate, 1, target)
            search.append(p)
            if on_point:
                on_point(p)
            good = p if p.meets else good
            rate = steps.send(p.meets)
    except StopIteration:
        pass
    return CapacityAnswer("max-rate", good, tuple(search), target, None)


def min_gpus(evaluate: Evaluate, rate: float, target: float = 0.9, max_replicas: int = 4096,
             on_point: Callable[[Point], None] | None = None) -> CapacityAnswer:
    check_target(target)
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


def check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise ConfigError(f"--target must be in (0, 1], got {target}")


@dataclass(frozen=True)
class Interval:
    """Mean of per-seed values with a two-sided Student-t interval (the module note)."""
    mean: float
    low: float
    high: float
    values: tuple[float, ...]
    confidence: float


def t_interval(values: list[float] | tuple[float, ...], confidence: float = 0.9) -> Interval:
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence must be in (0, 1), got {confidence}")
    vals = tuple(float(v) for v in values)
    k = len(vals)
    mean = math.fsum(vals) / k
    # no spread: the value itself (fsum / k may miss it by an ulp); a NaN is never equal
    if k < 2 or all(v == vals[0] for v in vals):
        mean = vals[0] if k else mean
        return Interval(mean, mean, mean, vals, confidence)
    from scipy.stats import t as student_t  # scipy only when there is a spread to bound

    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (k - 1))
    half = float(student_t.ppf((1 + confidence) / 2, k - 1)) * sd / math.sqrt(k)
    return Interval(mean, mean - half, mean + half, vals, confidence)


def cost_per_million_tokens(gpus: float, price_per_gpu_hour: float, rate: float,
                            tokens_per_request: float) -> float | None:
    """Dollars per million (prompt + output) tokens for `gpus` serving `rate` req/s."""
    if rate <= 0 or tokens_per_request <= 0:
        return None
    return gpus * price_per_gpu_hour / (rate * tokens_per_request * 3600) * 1e6


def tokens_per_request(metrics: dict[str, Any]) -> float:
    req = metrics.get("request_throughput") or 0.0
    return (metrics.get("total_token_throughput") or 0.0) / req if req else 0.0


@dataclass(frozen=True)
class SeededAnswer:
    """One capacity answer per seed and the interval over them (the module note)."""
    kind: str
    seeds: tuple[int, ...]
    answers: tuple[CapacityAnswer, ...]
    interval: Interval
    price_per_gpu_hour: float | None

    def summary(self) -> dict[str, Any]:
        found = [a for a in self.answers if a.point is not None]
        iv = self.interval
        out: dict[str, Any] = {"kind": self.kind, "target": self.answers[0].target,
                               "found": bool(found), "seeds": list(self.seeds),
                               "confidence": iv.confidence, "method": "student-t over seeds"}
        if not found:
            return out
        metrics = [a.point.metrics for a in found if a.point is not None]
        gpus_per_replica = metrics[0]["gpus"] // metrics[0]["replicas"]
        energy = math.fsum(m["energy_per_token_j"] or 0.0 for m in metrics) / len(metrics)
        tokens = math.fsum(tokens_per_request(m) for m in metrics) / len(metrics)
        out["energy_per_token_j"] = energy
        if self.kind == "max-rate":
            out |= {"rate_per_replica": iv.mean, "rate_per_replica_low": max(iv.low, 0.0),
                    "rate_per_replica_high": iv.high, "per_seed": list(iv.values),
                    "conservative_rate_per_replica": max(iv.low, 0.0), "gpus": gpus_per_replica}
            rate, gpus = max(iv.low, 0.0), gpus_per_replica
        else:
            rate = self.answers[0].search[0].rate
            replicas = math.ceil(iv.high - 1e-9)
            out |= {"rate": rate, "replicas": iv.mean, "replicas_low": iv.low,
                    "replicas_high": iv.high, "per_seed": list(iv.values),
                    "conservative_replicas": replicas, "gpus": replicas * gpus_per_replica}
            gpus = replicas * gpus_per_replica
        if self.price_per_gpu_hour is not None:
            cost = cost_per_million_tokens(gpus, self.price_per_gpu_hour, rate, tokens)
            if cost is not None:
                out["cost_per_million_tokens"] = cost
        return out

    def answer_line(self) -> str:
        """'answer: 3.9 req/s per replica (90% CI over 3 seeds, Student t: ...)...'."""
        a, iv = self.summary(), self.interval
        k = f"{iv.confidence:.0%} CI over {len(self.seeds)} seed{'s' * (len(self.seeds) > 1)}, Student t"
        if self.kind == "max-rate":
            text = (f"answer: {a['rate_per_replica']:.3f} req/s per replica ({k}: "
                    f"{a['rate_per_replica_low']:.3f} to {a['rate_per_replica_high']:.3f}; per seed "
                    f"{', '.join(f'{v:.3f}' for v in iv.values)}); conservative "
                    f"{a['conservative_rate_per_replica']:.3f}")
        else:
            text = (f"answer: {a['replicas']:.2f} replicas for {a['rate']:g} req/s ({k}: "
                    f"{a['replicas_low']:.2f} to {a['replicas_high']:.2f}); conservative "
                    f"{a['conservative_replicas']} replicas, {a['gpus']} GPUs")
        text += f", {a['energy_per_token_j']:.4f} J/token"
        if "cost_per_million_tokens" in a:
            text += f", ${a['cost_per_million_tokens']:.3f} per million tokens at the conservative end"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.summary(),
                "per_seed": [{"seed": s, **a.to_dict()} for s, a in zip(self.seeds, self.answers,
                                                                       strict=True)]}


def over_seeds(search: Callable[[int], CapacityAnswer], seeds: list[int], confidence: float = 0.9,
               price_per_gpu_hour: float | None = None) -> SeededAnswer:
    """Run `search(seed)` (max_rate or min_gpus on that seed's evaluator) for each seed."""
    if not seeds:
        raise ConfigError("--seeds must be at least 1")
    answers = tuple(search(s) for s in seeds)
    kind = answers[0].kind
    if kind == "max-rate":
        values = [a.point.rate / a.point.replicas if a.point else 0.0 for a in answers]
    else:  # a seed that needs more than the replica limit counts as the limit's next doubling
        values = [float(a.point.replicas) if a.point else float(2 * max(p.replicas for p in a.search))
                  for a in answers]
    return SeededAnswer(kind, tuple(seeds), answers, t_interval(values, confidence),
                        price_per_gpu_hour)
