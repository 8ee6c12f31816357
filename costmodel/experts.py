"""Expected distinct experts touched by n tokens under top-k routing, and expert-parallel imbalance.

Expert i appears in one token's top-k with probability q_i. Tokens route independently, so the
expected number of distinct experts among n tokens is sum_i 1 - (1 - q_i)^n. Uniform routing
has q_i = k/E, giving the occupancy formula E * (1 - (1 - k/E)^n).

Skew: expert popularities p_i follow the expected order statistics of a log-normal with
parameter sigma (`routing_skew`; 0 is uniform), i.e. p_i proportional to exp(sigma * z_i) with
z_i the normal quantiles. A top-k set is drawn from p without replacement; we approximate its
inclusion probabilities by q_i = 1 - exp(-lam * p_i) with lam chosen so that sum q_i = k (exact
for uniform p; within 1% of a Gumbel top-k Monte Carlo for sigma up to 2, see the tests).

Expert parallelism: expert i's expected load is proportional to q_i; ep ranks hold E/ep experts
each and the busiest rank's load over the mean rank load is the imbalance. Two placements:
- "round_robin": expert of popularity rank i on rank i mod ep (hot experts spread on purpose).
- "random": expert ids carry no popularity information, as with vLLM's default contiguous expert
  map without EPLB (and the engine here, which shuffles hot experts per layer). The imbalance is
  the mean of max(rank load)/mean(rank load) over a fixed, seeded set of random placements
  (`PLACEMENT_SAMPLES` permutations, so the figure is deterministic).

AIConfigurator's skewed MoE tables (`distribution` = power_law_<alpha>) draw each expert's
token count i.i.d. from a bounded power law x^-alpha on [1, 0.8 n] (n tokens, when n*k > E;
otherwise on [0.01, 2]), scale the counts to n*k, cap each at n (each token picks distinct
experts) and measure the busiest expert-parallel rank. Their spread grows with n, so no single
sigma reproduces them; `power_law_skew` maps (alpha, n) to the sigma whose load coefficient of
variation (std/mean of q) equals that of the table's counts, taken from the power law's
quantiles at (j + 0.5)/E with each share capped at 1/k and the excess filled into the least
loaded experts, as the tables do. Matching the coefficient of variation,
rather than the top expert's share, is what makes the "random" imbalance reproduce the tables'
busiest-rank load (tests/test_routing_tables.py).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtri

Placement = Literal["round_robin", "random"]
PLACEMENT_SAMPLES = 2048  # random placements averaged by ep_imbalance(..., "random")
_PLACEMENT_SEED = 0
_MAX_SKEW = 5.0  # the same ceiling as costmodel.model.MAX_ROUTING_SKEW


def popularity(num_experts: int, skew: float) -> np.ndarray:
    """Routing mass per expert, most popular first; sums to 1."""
    ranks = (np.arange(num_experts) + 0.5) / num_experts
    z = -ndtri(ranks)  # descending normal quantiles
    weights = np.exp(skew * z)
    return np.asarray(weights / weights.sum())


def inclusion_probabilities(num_experts: int, top_k: int, skew: float) -> np.ndarray:
    if skew == 0 or top_k == num_experts:
        return np.full(num_experts, top_k / num_experts)
    p = popularity(num_experts, skew)
    lam = brentq(lambda x: float((-np.expm1(-x * p)).sum()) - top_k, 1e-12, 1e12)
    return np.asarray(-np.expm1(-lam * p))


def _load_cv(q: np.ndarray) -> float:
    return float(q.std() / q.mean())


class ExpertActivation:
    """Distinct experts for a token count, cached: the simulator asks for the same counts often."""

    def __init__(self, num_experts: int, top_k: int, skew: float) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.skew = skew
        self.q = inclusion_probabilities(num_experts, top_k, skew) if num_experts else np.zeros(0)
        self._log1m_q = np.log1p(-np.minimum(self.q, 1.0 - 1e-15))
        self.distinct = lru_cache(maxsize=65536)(self._distinct)
        self._random_imbalance: dict[int, float] = {}

    def _distinct(self, num_tokens: int) -> float:
        if num_tokens <= 0 or not self.num_experts:
            return 0.0
        return float(self.num_experts - np.exp(num_tokens * self._log1m_q).sum())

    def ep_imbalance(self, ep: int, placement: Placement = "round_robin") -> float:
        """Busiest rank's share of the routing mass times ep (1 = balanced).

        "round_robin" puts expert i (by popularity rank) on rank i mod ep, the placement a
        load-aware deployment would start from; "random" averages over popularity-blind
        placements (vLLM without EPLB). See the module docstring.
        """
        if ep <= 1 or not self.num_experts:
            return 1.0
        if placement == "round_robin":
            per_rank = np.array([self.q[r::ep].sum() for r in range(ep)])
            return float(per_rank.max() / per_rank.mean())
        if placement != "random":
            raise ValueError(f"placement {placement!r}: expected 'round_robin' or 'random'")
        if self.num_experts % ep:
            raise ValueError(f"ep {ep} does not divide {self.num_experts} experts")
        if ep not in self._random_imbalance:
            self._random_imbalance[ep] = self._random_placement_imbalance(ep)
        return self._random_imbalance[ep]

    def _random_placement_imbalance(self, ep: int) -> float:
        rng = np.random.default_rng(_PLACEMENT_SEED)
        perms = rng.permuted(np.tile(np.arange(self.num_experts), (PLACEMENT_SAMPLES, 1)), axis=1)
        per_rank = self.q[perms].reshape(PLACEMENT_SAMPLES, ep, -1).sum(axis=2)
        return float((per_rank.max(axis=1) / per_rank.mean(axis=1)).mean())


def uniform_distinct(num_experts: int, top_k: int, num_tokens: int) -> float:
    """The occupancy formula, for tests and documentation."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def power_law_bounds(num_tokens: int, num_experts: int, top_k: int) -> tuple[float, float]:
    """Range of AIConfigurator's per-expert power-law draws for a table row of n tokens."""
    if num_tokens * top_k > num_experts:
        return 1.0, 0.8 * num_tokens
    return 0.01, 2.0


def power_law_shares(alpha: float, num_tokens: int, num_experts: int, top_k: int) -> np.ndarray:
    """Expected routing shares of a power_law_<alpha> table row, most popular first.

    The power law's quantiles at (j + 0.5)/E, normalised, each capped at 1/k (an expert serves
    each token at most once), the excess raising the least loaded experts to a common level.
    """
    if alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: the tables' power law needs alpha > 1")
    lo, hi = power_law_bounds(num_tokens, num_experts, top_k)
    u = (np.arange(num_experts)[::-1] + 0.5) / num_experts
    a = 1.0 - alpha
    x = ((hi**a - lo**a) * u + lo**a) ** (1.0 / a)
    share = x / x.sum()
    cap = 1.0 / top_k
    excess = float(np.clip(share - cap, 0.0, None).sum())
    share = np.minimum(share, cap)
    if excess > 0:  # the tables hand the excess, a unit at a time, to the least loaded experts
        level = brentq(lambda v: float(np.clip(v - share, 0.0, None).sum()) - excess,
                       float(share.min()), cap)
        share = np.maximum(share, level)
    return np.asarray(share)


def skew_for_load_cv(num_experts: int, top_k: int, cv: float) -> float:
    """The sigma whose per-expert load (q) has coefficient of variation `cv`, within [0, 5]."""
    if cv <= 0 or top_k == num_experts:
        return 0.0

    def gap(s: float) -> float:
        return _load_cv(inclusion_probabilities(num_experts, top_k, s)) - cv

    if gap(_MAX_SKEW) <= 0:
        return _MAX_SKEW
    return float(brentq(gap, 1e-9, _MAX_SKEW, xtol=1e-6))


def power_law_skew(alpha: float, num_tokens: int, num_experts: int, top_k: int) -> float:
    """Sigma equivalent to AIConfigurator's power_law_<alpha> distribution at n tokens.

    Matches the per-expert load's coefficient of variation (see the module docstring). For
    n*k <= E the tables assign experts without collisions, so use this for load spread and
    expert-parallel imbalance, not for the distinct-expert count of such tiny batches.
    """
    return skew_for_load_cv(num_experts, top_k,
                            _load_cv(power_law_shares(alpha, num_tokens, num_experts, top_k)))
