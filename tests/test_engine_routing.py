"""The engine's router against the cost model's expert-activation model, uniform and skewed."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from costmodel import ExpertActivation, Tile, load_model, uniform_distinct

torch = pytest.importorskip("torch")
LENGTHS = (4, 16, 64)


@cache
def measured(skew: float) -> dict[int, float]:
    """Mean distinct experts per layer for prompts of each length (32 experts, top-4)."""
    from engine.executor import Engine

    spec = load_model("tiny-moe").with_overrides(num_experts=32, top_k=4, num_layers=2,
                                                 sliding_layers=(False, False))
    values: dict[int, list[int]] = {n: [] for n in LENGTHS}
    for seed in range(4):
        engine = Engine(spec, "cpu", seed=seed, kv_tokens=8192, routing_skew=skew)
        for rid in range(3):
            for n in LENGTHS:
                req = rid * 100 + n
                engine.add_request(req, n)
                values[n].extend(engine.execute((Tile(req, 0, n, 0, 2, 0, True),)).experts_touched)
                engine.release(req)
    return {n: float(np.mean(v)) for n, v in values.items()}


SAMPLES = 4 * 3 * 2  # measured(): seeds x requests x layers, per prompt length


def uniform_distinct_sd(E: int, k: int, n: int) -> float:
    """Standard deviation of the distinct experts n independent top-k tokens touch, uniform
    routing: expert i is missed with a = (1 - k/E)^n, a pair both missed with
    b = ((E - k)(E - k - 1) / (E (E - 1)))^n; Var = E a (1 - a) + E (E - 1) (b - a^2)."""
    a = (1 - k / E) ** n
    b = ((E - k) * (E - k - 1) / (E * (E - 1))) ** n
    return float(np.sqrt(E * a * (1 - a) + E * (E - 1) * (b - a * a)))


@pytest.mark.parametrize("num_tokens", LENGTHS)
def test_random_router_routes_close_to_uniform(num_tokens):
    # Tokens of one prompt are correlated through attention, so a random router touches fewer
    # experts than independent uniform routing would (14% fewer at 4 tokens); never more, up
    # to 3 standard errors of the mean of SAMPLES draws. Below: each token picks k distinct
    # experts, so a prompt touches at least k (all tokens alike) and at most min(E, n k).
    got = measured(0.0)[num_tokens]
    want = uniform_distinct(32, 4, num_tokens)
    assert 4 <= got <= min(32, 4 * num_tokens)
    assert got <= want + 3 * uniform_distinct_sd(32, 4, num_tokens) / np.sqrt(SAMPLES)


@pytest.mark.parametrize("skew", [0.9, 1.5])
@pytest.mark.parametrize("num_tokens", LENGTHS)
def test_skewed_router_reproduces_the_cost_models_skew(skew, num_tokens):
    got = measured(skew)[num_tokens]
    want = ExpertActivation(32, 4, skew).distinct(num_tokens)
    # The absolute count also carries the prompt's token correlation seen above (up to ~14% at
    # 4 tokens); from 16 tokens on, the skew's own effect relative to the random router matches
    # the model's within 8%.
    assert got == pytest.approx(want, rel=0.15)
    ratio = got / measured(0.0)[num_tokens]
    if num_tokens >= 16:
        assert ratio == pytest.approx(want / uniform_distinct(32, 4, num_tokens), rel=0.08)
    if num_tokens == 16:  # below saturation, skew visibly lowers it
        assert ratio < 0.92
