"""core/growth.py's block arithmetic for decode steps against a count done step by step."""

from __future__ import annotations

import numpy as np
import pytest

from core.growth import decode_growth, decode_steps_that_fit
from core.request import RequestState


def _requests(rng: np.random.Generator, count: int, block_size: int) -> list[RequestState]:
    out = []
    for i in range(count):
        r = RequestState(i, 0.0, 10, 500)
        r.num_computed_tokens = int(rng.integers(1, 400))
        blocks = -(-r.num_computed_tokens // block_size) + int(rng.integers(0, 2))
        r.block_table.block_ids = list(range(blocks))
        r.block_table.extra_block_ids = [0] * int(rng.integers(0, 2))
        out.append(r)
    return out


def _steps_that_fit_by_stepping(requests: list[RequestState], most: int, block_size: int,
                                free: int) -> int:
    """Decode one step at a time until the next step's new blocks are not free."""
    for j in range(1, most + 1):
        if decode_growth(requests, j, block_size) > free:
            return j - 1
    return most


@pytest.mark.parametrize("count", [1, 7, 32, 33, 120])  # plain ints up to 32, numpy beyond
@pytest.mark.parametrize("seed", range(4))
def test_decode_steps_that_fit_as_stepping_finds(count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for block_size in (1, 16):
        requests = _requests(rng, count, block_size)
        for free in (0, 3, count, 5 * count, 10_000):
            for most in (1, 17, 300):
                want = _steps_that_fit_by_stepping(requests, most, block_size, free)
                assert decode_steps_that_fit(requests, most, block_size, free) == want
