"""The inverse normal CDF and the root-finder that replace scipy in costmodel/experts.py.

Closed-form and hand-checked values first; then the same bits as scipy.special.ndtri and
scipy.optimize.brentq (scipy stays a dependency of calibrate/), which is what keeps every
result of the simulator unchanged to the last digit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from costmodel.experts import brentq, ndtri, popularity, power_law_skew

SQRT2 = math.sqrt(2.0)


def phi(x: float) -> float:
    """The standard normal CDF."""
    return 0.5 * math.erfc(-x / SQRT2)


# p from 1e-300 to 1 - 1e-16: the tails by powers of ten, the body on a fine grid
GRID = ([10.0 ** -k for k in range(1, 301)] + [1.0 - 10.0 ** -k for k in range(1, 17)]
        + np.linspace(1e-6, 1 - 1e-6, 4001).tolist() + [5e-324, 2.2250738585072014e-308])


@pytest.mark.parametrize(("p", "x"), [
    (0.5, 0.0),
    (0.975, 1.959963984540054),  # the 95% two-sided normal interval
    (0.8413447460685429, 1.0),  # Phi(1), to double precision
    (0.15865525393145707, -1.0),  # Phi(-1)
    (0.9986501019683699, 3.0),  # Phi(3)
    (0.0013498980316300946, -3.0),
    (2.866515718791939e-07, -5.0),  # Phi(-5)
])
def test_ndtri_known_values(p, x):
    assert ndtri(p) == pytest.approx(x, rel=1e-15, abs=1e-15)


def test_ndtri_ends_and_outside():
    assert ndtri(0.0) == -math.inf
    assert ndtri(1.0) == math.inf
    for p in (-1e-300, -0.5, 1.0 + 1e-15, 2.0, math.nan, math.inf, -math.inf):
        assert math.isnan(ndtri(p))


def test_ndtri_symmetric_and_increasing():
    xs = [ndtri(p) for p in sorted(set(GRID))]
    assert all(a < b for a, b in zip(xs[:-1], xs[1:], strict=True))  # on distinct p: rising
    for p in GRID:
        q = 1.0 - p
        if 1.0 - q == p:  # p and 1 - p both exact: the quantiles are exact negatives
            assert ndtri(q) == -ndtri(p)


def test_ndtri_round_trip():
    """Phi(ndtri(p)) = p to a few ulps of x: relative 1e-15, times 1 + x^2 in the tails
    (Phi's relative slope there is |x|, and x itself is known to its last bits only)."""
    for p in GRID[:-2]:  # not the subnormal ones: Phi(x) has fewer bits there
        x = ndtri(p)
        assert abs(phi(x) / p - 1.0) <= 1e-15 * (1.0 + x * x), p


def test_ndtri_is_scipys_to_the_bit():
    special = pytest.importorskip("scipy.special")
    ps = np.concatenate([np.array(GRID), np.random.default_rng(0).random(20000),
                         np.exp(-np.random.default_rng(1).uniform(0, 700, 5000)),
                         [0.0, 1.0, -0.5, 1.5, math.exp(-2), 1 - math.exp(-2), math.exp(-32)]])
    ours = np.array([ndtri(p) for p in ps.tolist()])
    np.testing.assert_array_equal(ours, special.ndtri(ps))
    for e in (1, 2, 7, 8, 32, 64, 128, 160, 256, 384, 512):  # the ranks popularity() uses
        ranks = (np.arange(e) + 0.5) / e
        np.testing.assert_array_equal([ndtri(r) for r in ranks.tolist()], special.ndtri(ranks))


def test_popularity_is_the_scipy_formula():
    special = pytest.importorskip("scipy.special")
    for e, skew in ((8, 0.0), (32, 0.7), (128, 1.2), (256, 3.3)):
        z = -special.ndtri((np.arange(e) + 0.5) / e)
        w = np.exp(skew * z)
        np.testing.assert_array_equal(popularity(e, skew), w / w.sum())


@pytest.mark.parametrize(("f", "a", "b", "root"), [
    (lambda x: x * x - 2.0, 0.0, 2.0, math.sqrt(2.0)),
    (lambda x: math.cos(x) - x, 0.0, 1.0, 0.7390851332151607),  # the Dottie number
    (lambda x: math.exp(x) - 10.0, -5.0, 5.0, math.log(10.0)),
    (math.sin, 3.0, 4.0, math.pi),
    (lambda x: 1.0 if x > 1 / 3 else -1.0, 0.0, 1.0, 1 / 3),  # a jump, no root: bisection
])
def test_brentq_finds_roots(f, a, b, root):
    assert abs(brentq(f, a, b) - root) <= 2e-12 + 4 * np.finfo(float).eps * abs(root) + 1e-15
    assert abs(brentq(f, b, a) - root) <= 2e-12 + 4 * np.finfo(float).eps * abs(root) + 1e-15


def test_brentq_tolerance_and_endpoints():
    assert abs(brentq(lambda x: x - 0.3, 0.0, 1.0, xtol=1e-3) - 0.3) <= 1e-3
    assert brentq(lambda x: x - 2.0, 2.0, 5.0) == 2.0  # a root at an end is returned as is
    assert brentq(lambda x: x - 5.0, 2.0, 5.0) == 5.0


def test_brentq_errors():
    with pytest.raises(ValueError, match="different signs"):
        brentq(lambda x: x * x + 1.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        brentq(lambda x: math.nan if x > 0.5 else -1.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="converge"):
        brentq(lambda x: math.cos(x) - x, 0.0, 1.0, maxiter=2)


def test_brentq_is_scipys_to_the_bit():
    optimize = pytest.importorskip("scipy.optimize")
    p = popularity(128, 1.2)
    cases = [
        (lambda x: float((-np.expm1(-x * p)).sum()) - 8, 1e-12, 1e12, {}),  # experts' lambda
        (lambda x: math.cos(x) - x, 0.0, 1.0, {}),
        (lambda x: x ** 3 - 2 * x - 5, 2.0, 3.0, {}),
        (lambda x: math.tanh(x - 0.2), -3.0, 40.0, {"xtol": 1e-6}),
        (lambda x: math.log(x), 0.01, 7.0, {"xtol": 1e-9}),
        (lambda x: math.log(x), 0.01, 7.0, {"xtol": 1e-3}),  # stops short: the tolerance shows
        (lambda x: x ** 3 - 2 * x - 5, 0.0, 30.0, {"xtol": 1e-2}),
        (lambda x: 1.0 if x > 1 / 3 else -1.0, 0.0, 1.0, {"xtol": 1e-5, "rtol": 1e-3}),
    ]
    for f, a, b, kw in cases:
        assert brentq(f, a, b, **kw) == optimize.brentq(f, a, b, **kw)


def test_power_law_skew_is_scipys_to_the_bit():
    """The experts' nested solve (a brentq over brentqs) against scipy's, end to end."""
    optimize = pytest.importorskip("scipy.optimize")
    import costmodel.experts as experts

    ours = [power_law_skew(a, n, 128, 8) for a, n in ((1.2, 64), (1.5, 1024), (2.0, 8192))]
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(experts, "brentq", optimize.brentq)
        theirs = [power_law_skew(a, n, 128, 8) for a, n in ((1.2, 64), (1.5, 1024), (2.0, 8192))]
    finally:
        mp.undo()
    assert ours == theirs
