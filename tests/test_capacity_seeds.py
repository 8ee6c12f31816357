"""`capacity --seeds K`: one search per seed and a Student-t interval over their answers."""

from __future__ import annotations

import json

import pytest
from scipy import stats

from cli.main import main
from sim.capacity import max_rate, over_seeds, t_interval
from tests.test_capacity import D, evaluator


def test_t_interval_by_hand() -> None:
    vals = [3.0, 3.5, 4.0]
    iv = t_interval(vals, 0.9)
    half = stats.t.ppf(0.95, 2) * 0.5 / 3 ** 0.5  # sample sd of (3, 3.5, 4) is 0.5
    assert iv.mean == pytest.approx(3.5)
    assert (iv.low, iv.high) == pytest.approx((3.5 - half, 3.5 + half))
    one = t_interval([2.0], 0.9)
    assert (one.mean, one.low, one.high) == (2.0, 2.0, 2.0)  # one seed: no interval


def test_over_seeds_prices_the_conservative_end() -> None:
    # the same server whatever the seed: every seed's answer is the service rate, no spread
    ans = over_seeds(lambda seed: max_rate(evaluator(duration_s=5.0), 0.9, start_rate=30.0,
                                           rel_tol=0.02), [0, 1], 0.9, price_per_gpu_hour=2.0)
    s = ans.summary()
    assert s["seeds"] == [0, 1] and s["found"]
    assert s["rate_per_replica_low"] == s["rate_per_replica"] == pytest.approx(1 / D, rel=0.02)
    assert s["cost_per_million_tokens"] > 0


def test_capacity_cli_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["capacity", "--policies", "layered", "--duration", "5", "--start-rate", "2"]
    assert main([*args, "--seeds", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seeds"] == [0, 1] and out["method"] == "student-t over seeds"
    low, mean, high = out["rate_per_replica_low"], out["rate_per_replica"], out["rate_per_replica_high"]
    assert low <= mean <= high and out["conservative_rate_per_replica"] == max(low, 0.0)
    assert len(out["per_seed"]) == 2
    # seed 0 alone is today's single-seed answer
    assert main([*args, "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["rate_per_replica"] == out["per_seed"][0]
    assert main([*args, "--seeds", "0"]) == 2
    assert "--seeds: seeds must be a whole number from 1 to 1000" in capsys.readouterr().err
