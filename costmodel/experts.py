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

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Literal

import numpy as np

Placement = Literal["round_robin", "random"]
PLACEMENT_SAMPLES = 2048  # random placements averaged by ep_imbalance(..., "random")
_PLACEMENT_SEED = 0
_MAX_SKEW = 5.0  # the same ceiling as costmodel.model.MAX_ROUTING_SKEW


# The two numerical routines below replace scipy.special.ndtri and scipy.optimize.brentq with
# the same arithmetic, so that pricing (and with it every command but calibrate) does not
# import scipy (0.3 s) and every result stays the same to the last bit.

# The inverse normal CDF of the Cephes Math Library (S. L. Moshier, 1989), which
# scipy.special.ndtri evaluates: rational approximations in y - 0.5 near the centre and in
# 1/z, z = sqrt(-2 log y), in the tails; coefficients highest power first, the denominators'
# leading 1 implied. Relative error below 7.2e-16 (Cephes' own test). A refined rational
# approximation of another source (Acklam's plus Halley steps) is as accurate, but not the same
# to the last bit, which `--json` output and results folders show.
_CENTRE_P = (-5.99633501014107895267E1, 9.80010754185999661536E1, -5.66762857469070293439E1,
             1.39312609387279679503E1, -1.23916583867381258016E0)
_CENTRE_Q = (1.95448858338141759834E0, 4.67627912898881538453E0, 8.63602421390890590575E1,
             -2.25462687854119370527E2, 2.00260212380060660359E2, -8.20372256168333339912E1,
             1.59056225126211695515E1, -1.18331621121330003142E0)
# 2 <= z < 8: y down to exp(-32)
_NEAR_P = (4.05544892305962419923E0, 3.15251094599893866154E1, 5.71628192246421288162E1,
           4.40805073893200834700E1, 1.46849561928858024014E1, 2.18663306850790267539E0,
           -1.40256079171354495875E-1, -3.50424626827848203418E-2, -8.57456785154685413611E-4)
_NEAR_Q = (1.57799883256466749731E1, 4.53907635128879210584E1, 4.13172038254672030440E1,
           1.50425385692907503408E1, 2.50464946208309415979E0, -1.42182922854787788574E-1,
           -3.80806407691578277194E-2, -9.33259480895457427372E-4)
# z >= 8
_FAR_P = (3.23774891776946035970E0, 6.91522889068984211695E0, 3.93881025292474443415E0,
          1.33303460815807542389E0, 2.01485389549179081538E-1, 1.23716634817820021358E-2,
          3.01581553508235416007E-4, 2.65806974686737550832E-6, 6.23974539184983293730E-9)
_FAR_Q = (6.02427039364742014255E0, 3.67983563856160859403E0, 1.37702099489081330271E0,
          2.16236993594496635890E-1, 1.34204006088543189037E-2, 3.28014464682127739104E-4,
          2.89247864745380683936E-6, 6.79019408009981274425E-9)
_EXP_M2 = 0.13533528323661269189  # exp(-2): the centre's edge
_SQRT_2PI = 2.50662827463100050242


def _poly(coefs: tuple[float, ...], x: float, monic: bool = False) -> float:
    """Horner's rule; `monic`: with a leading coefficient 1 before `coefs`."""
    acc = 1.0 if monic else 0.0
    for c in coefs:
        acc = acc * x + c
    return acc


def ndtri(p: float) -> float:
    """The standard normal quantile: x with Phi(x) = p, bit for bit scipy.special.ndtri.

    p = 0 and 1 give -inf and inf; p outside [0, 1], or NaN, gives NaN.
    """
    if not 0.0 < p < 1.0:
        return -math.inf if p == 0.0 else math.inf if p == 1.0 else math.nan
    upper = p > 1.0 - _EXP_M2
    y = 1.0 - p if upper else p
    if y > _EXP_M2:
        y -= 0.5
        y2 = y * y
        x = y + y * (y2 * _poly(_CENTRE_P, y2) / _poly(_CENTRE_Q, y2, monic=True))
        return x * _SQRT_2PI
    z = math.sqrt(-2.0 * math.log(y))
    tail_p, tail_q = (_NEAR_P, _NEAR_Q) if z < 8.0 else (_FAR_P, _FAR_Q)
    inv = 1.0 / z
    x = z - math.log(z) / z - inv * _poly(tail_p, inv) / _poly(tail_q, inv, monic=True)
    return x if upper else -x


def brentq(f: Callable[[float], float], a: float, b: float, xtol: float = 2e-12,
           rtol: float = 4 * np.finfo(float).eps, maxiter: int = 100) -> float:
    """A root of f in [a, b], where f(a) and f(b) differ in sign: Brent's method (inverse
    quadratic interpolation, secant steps and bisection) as scipy.optimize.brentq runs it,
    with its tolerances: the root is within xtol + rtol * |root|.
    """
    def value(x: float) -> float:
        fx = float(f(x))
        if math.isnan(fx):
            raise ValueError(f"The function value at x={x} is NaN; solver cannot continue.")
        return fx

    # x: the newest estimate, fx = f(x); prev: the estimate before; far: the end of the
    # bracket opposite x (f(far) and f(x) differ in sign); step, last_step: the latest steps
    prev, x = float(a), float(b)
    fprev, fx = value(prev), value(x)
    if fprev == 0:
        return prev
    if fx == 0:
        return x
    if (fprev < 0) == (fx < 0):
        raise ValueError("f(a) and f(b) must have different signs")
    far = ffar = last_step = step = 0.0
    for _ in range(maxiter):
        if (fprev < 0) != (fx < 0):  # the root lies between prev and x: a new bracket
            far, ffar = prev, fprev
            last_step = step = x - prev
        if abs(ffar) < abs(fx):  # keep the better end as x
            prev, x, far = x, far, x
            fprev, fx, ffar = fx, ffar, fx
        tol = (xtol + rtol * abs(x)) / 2
        half = (far - x) / 2
        if fx == 0 or abs(half) < tol:
            return x
        if abs(last_step) > tol and abs(fx) < abs(fprev):
            if prev == far:  # secant
                trial = -fx * (x - prev) / (fx - fprev)
            else:  # inverse quadratic interpolation through prev, x, far
                slope_prev = (fprev - fx) / (prev - x)
                slope_far = (ffar - fx) / (far - x)
                trial = -fx * (ffar * slope_far - fprev * slope_prev) / (
                    slope_far * slope_prev * (ffar - fprev))
            if 2 * abs(trial) < min(abs(last_step), 3 * abs(half) - tol):
                last_step, step = step, trial
            else:
                last_step = step = half
        else:
            last_step = step = half
        prev, fprev = x, fx
        x += step if abs(step) > tol else (tol if half > 0 else -tol)
        fx = value(x)
    raise RuntimeError(f"Failed to converge after {maxiter} iterations, value is {x}.")


@lru_cache(maxsize=256)
def _normal_ranks(num_experts: int) -> np.ndarray:
    """Descending normal quantiles at (i + 0.5) / E (read-only: shared by every call)."""
    ranks = (np.arange(num_experts) + 0.5) / num_experts
    z = -np.array([ndtri(r) for r in ranks.tolist()], dtype=float)
    z.flags.writeable = False
    return z


def popularity(num_experts: int, skew: float) -> np.ndarray:
    """Routing mass per expert, most popular first; sums to 1."""
    z = _normal_ranks(num_experts)  # descending normal quantiles
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
