"""From each configuration's probes to its answer, and the answers ranked.

Per configuration and seed, the bisection (sim.capacity.rate_steps) ends at the highest rate
per replica that met the SLO target: that seed's capacity c_j (0 when no rate met it). The
configuration's capacity is the Student-t interval over its seeds (sim.capacity.t_interval;
no interval with one seed), and everything that prices it uses the interval's lower end, the
conservative capacity c_lo:

- GPUs for the target rate R (when given): ceil(R / (replicas x c_lo)) x replicas x GPUs per
  replica, i.e. the probed fleet (`replicas` replicas of tp x ep GPUs) repeated as often as R
  needs; without R, one probed fleet.
- cost per million (prompt + output) tokens: those GPUs x the GPU type's price per hour, over
  the tokens they serve in an hour (R, or replicas x c_lo, times the mean tokens per request).
- energy per token, p99 TTFT: the mean over seeds of the simulation at each seed's capacity.

A split search (`split_pools`) answers each configuration with its cheapest prefill/decode
split at the target rate instead (sim/split.py, every split tried on every seed): its GPUs are
that split's, its cost those GPUs over the tokens of the target rate, its energy per token and
p99 TTFT the means over seeds at that split.

Ranking: cheapest first by that cost (unpriced configurations after the priced ones), then
fewest GPUs, then the highest conservative capacity per GPU, then the label, so that ties
break the same way every time. Configurations where no rate met the target come last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from search.probe import KEEP
from sim.capacity import Interval, Point, cost_per_million_tokens, t_interval, tokens_per_request


@dataclass(frozen=True)
class ProbePoint:
    """One finished probe as a search used it."""
    config: str
    seed: int
    rate_per_replica: float
    key: str
    metrics: dict[str, Any]
    meets: bool
    split: tuple[int, int] | None = None  # (prefill, decode) workers of a split search's probe

    def row(self) -> dict[str, Any]:
        pools = {} if self.split is None else {"prefill_replicas": self.split[0],
                                               "decode_replicas": self.split[1]}
        # KEEP's order, whether the metrics came from a worker or from the store (sorted keys)
        return {"config": self.config, "seed": self.seed, "rate_per_replica": self.rate_per_replica,
                **pools, "meets": self.meets, "key": self.key,
                **{k: self.metrics.get(k) for k in KEEP}}


@dataclass(frozen=True)
class Answer:
    label: str
    values: dict[str, Any]
    replicas: int
    gpus_per_replica: int
    capacity: Interval  # rate per replica over seeds
    at_capacity: tuple[ProbePoint | None, ...]  # per seed: its highest passing probe
    price_per_gpu_hour: float | None
    target_rate: float | None

    @property
    def found(self) -> bool:
        return all(p is not None for p in self.at_capacity)

    @property
    def conservative(self) -> float:
        """The interval's lower end, at least 0 (a wide interval over few seeds reaches below)."""
        return max(self.capacity.low, 0.0)

    def _mean(self, key: str, fn: Any = None) -> float | None:
        got = [(fn(p.metrics) if fn else p.metrics.get(key)) for p in self.at_capacity if p]
        vals = [float(v) for v in got if v is not None]
        return math.fsum(vals) / len(vals) if vals else None

    @property
    def gpus(self) -> int | None:
        """GPUs at the conservative capacity: for the target rate, or one probed fleet."""
        fleet = self.replicas * self.gpus_per_replica
        if self.target_rate is None:
            return fleet
        if not self.found or self.conservative <= 0:
            return None
        return math.ceil(self.target_rate / (self.replicas * self.conservative) - 1e-12) * fleet

    @property
    def per_gpu(self) -> float:
        """Conservative req/s per GPU (a tie-break of the ranking)."""
        return self.conservative / self.gpus_per_replica if self.found else 0.0

    @property
    def cost(self) -> float | None:
        gpus, tokens = self.gpus, self._mean("", tokens_per_request)
        if not self.found or self.price_per_gpu_hour is None or gpus is None or not tokens:
            return None
        rate = self.target_rate if self.target_rate is not None else self.replicas * self.conservative
        return cost_per_million_tokens(gpus, self.price_per_gpu_hour, rate, tokens)

    def row(self) -> dict[str, Any]:
        iv = self.capacity
        return {"config": self.label, **{k: v for k, v in self.values.items()},
                "found": self.found, "seeds": len(iv.values),
                "rate_per_replica": iv.mean, "rate_per_replica_low": iv.low,
                "rate_per_replica_high": iv.high,
                "conservative_rate_per_replica": self.conservative,
                "per_seed": ",".join(f"{v:.6g}" for v in iv.values),
                "gpus_per_replica": self.gpus_per_replica, "gpus": self.gpus,
                "price_per_gpu_hour": self.price_per_gpu_hour,
                "cost_per_million_tokens": self.cost,
                "energy_per_token_j": self._mean("energy_per_token_j"),
                "p99_ttft_ms": self._mean("p99_ttft_ms"),
                "slo_attainment": self._mean("slo_attainment")}


def make_answer(label: str, values: dict[str, Any], gpus_per_replica: int,
                seeds_points: list[list[ProbePoint]], confidence: float,
                price: float | None, target_rate: float | None) -> Answer:
    """`seeds_points`: per seed, its probes in the order the bisection made them."""
    best: list[ProbePoint | None] = []
    for points in seeds_points:
        passing = [p for p in points if p.meets]
        best.append(passing[-1] if passing else None)  # the bisection's last pass is its answer
    caps = [p.rate_per_replica if p else 0.0 for p in best]
    return Answer(label, values, int(values["replicas"]), gpus_per_replica,
                  t_interval(caps, confidence), tuple(best), price, target_rate)


@dataclass(frozen=True)
class SplitAnswer:
    """A split search's answer for one configuration: its cheapest split at the target rate."""
    label: str
    values: dict[str, Any]
    gpus_per_prefill: int
    gpus_per_decode: int
    split: tuple[int, int] | None  # (prefill, decode) workers; None: none within the limit met
    at_split: Point | None  # the split over its seeds (sim/split.py: means, interval)
    splits_tried: int
    seeds: int
    price_per_gpu_hour: float | None
    target_rate: float

    @property
    def found(self) -> bool:
        return self.split is not None

    @property
    def gpus(self) -> int | None:
        if self.split is None:
            return None
        return self.split[0] * self.gpus_per_prefill + self.split[1] * self.gpus_per_decode

    @property
    def per_gpu(self) -> float:
        gpus = self.gpus
        return self.target_rate / gpus if gpus else 0.0

    def _metric(self, key: str) -> Any:
        return None if self.at_split is None else self.at_split.metrics.get(key)

    @property
    def cost(self) -> float | None:
        gpus, price = self.gpus, self.price_per_gpu_hour
        if gpus is None or price is None or self.at_split is None:
            return None
        tokens = tokens_per_request(self.at_split.metrics)
        return cost_per_million_tokens(gpus, price, self.target_rate, tokens) if tokens else None

    def row(self) -> dict[str, Any]:
        p, d = self.split if self.split is not None else (None, None)
        att = self._metric("slo_attainment")
        return {"config": self.label, **dict(self.values), "found": self.found,
                "seeds": self.seeds, "prefill_replicas": p, "decode_replicas": d,
                "gpus_per_prefill": self.gpus_per_prefill, "gpus_per_decode": self.gpus_per_decode,
                "splits_tried": self.splits_tried, "gpus": self.gpus,
                "price_per_gpu_hour": self.price_per_gpu_hour,
                "cost_per_million_tokens": self.cost,
                "energy_per_token_j": self._metric("energy_per_token_j"),
                "p99_ttft_ms": self._metric("p99_ttft_ms"), "slo_attainment": att,
                "slo_attainment_low": self._metric("slo_attainment_low") if self.seeds > 1 else att}


def make_split_answer(label: str, values: dict[str, Any], gpus_per_prefill: int,
                      gpus_per_decode: int, splits: list[Point], answer: tuple[int, int] | None,
                      seeds: int, price: float | None, target_rate: float) -> SplitAnswer:
    """`splits`: each split the walk tried, over its seeds; `answer`: the walk's."""
    at = next((pt for pt in splits if pt.split == answer), None) if answer else None
    return SplitAnswer(label, values, gpus_per_prefill, gpus_per_decode, answer, at, len(splits),
                       seeds, price, target_rate)


def rank(answers: list[Any]) -> list[Any]:
    """Answers (all Answer, or all SplitAnswer) in rank order."""
    def key(a: Answer | SplitAnswer) -> tuple[Any, ...]:
        cost = a.cost
        return (not a.found, cost is None, cost if cost is not None else 0.0,
                a.gpus if a.gpus is not None else math.inf, -a.per_gpu, a.label)
    return sorted(answers, key=key)
