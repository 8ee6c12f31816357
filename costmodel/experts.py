"""Expected distinct experts touched by n tokens under top-k routing.

Expert i appears in one token's top-k with probability q_i. Tokens route independently, so the
expected number of distinct experts among n tokens is sum_i 1 - (1 - q_i)^n. Uniform routing
has q_i = k/E, giving the occupancy formula E * (1 - (1 - k/E)^n).

Skew: expert popularities p_i follow the expected order statistics of a log-normal with
parameter sigma (`routing_skew`; 0 is uniform), i.e. p_i proportional to exp(sigma * z_i) with
z_i the normal quantiles. A top-k set is drawn from p without replacement; we approximate its
inclusion probabilities by q_i = 1 - exp(-lam * p_i) with lam chosen so that sum q_i = k (exact
for uniform p; within 1% of a Gumbel top-k Monte Carlo for sigma up to 2, see the tests).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtri


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


class ExpertActivation:
    """Distinct experts for a token count, cached: the simulator asks for the same counts often."""

    def __init__(self, num_experts: int, top_k: int, skew: float) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.skew = skew
        self.q = inclusion_probabilities(num_experts, top_k, skew) if num_experts else np.zeros(0)
        self._log1m_q = np.log1p(-np.minimum(self.q, 1.0 - 1e-15))
        self.distinct = lru_cache(maxsize=65536)(self._distinct)

    def _distinct(self, num_tokens: int) -> float:
        if num_tokens <= 0 or not self.num_experts:
            return 0.0
        return float(self.num_experts - np.exp(num_tokens * self._log1m_q).sum())

    def ep_imbalance(self, ep: int) -> float:
        """Busiest rank's share of the routing mass times ep (1 = balanced).

        Experts are placed round-robin by popularity rank (expert i on rank i mod ep), the
        placement a load-aware deployment would start from.
        """
        if ep <= 1 or not self.num_experts:
            return 1.0
        per_rank = np.array([self.q[r::ep].sum() for r in range(ep)])
        return float(per_rank.max() / per_rank.mean())


def uniform_distinct(num_experts: int, top_k: int, num_tokens: int) -> float:
    """The occupancy formula, for tests and documentation."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)
