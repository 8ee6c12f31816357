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


@pytest.mark.parametrize("seed", range(6))
def test_an_admission_counting_the_decodes_lazily_answers_as_one_counting_them_first(
        seed: int) -> None:
    """Admission's `uncounted` decodes (ReplicaState.admission) against the same decodes
    counted at once: every try_admit gives the same answer and leaves the same blocks free,
    near the edge (where the lazy one must count) and far from it."""
    from core.admission import Admission
    from core.blocks import BlockPool, BlockTable
    rng = np.random.default_rng(seed)
    bs = 4
    for _ in range(40):
        pool = BlockPool(int(rng.integers(20, 80)), bs)
        decodes = []
        for _ in range(int(rng.integers(0, 8))):
            t = BlockTable([], 0)
            n = int(rng.integers(1, 12))
            pool.allocate(t, n)
            t.num_tokens = int(rng.integers(max(1, (len(t.block_ids) - 1) * bs + 1),
                                            len(t.block_ids) * bs + 1))
            r = RequestState(len(decodes), 0.0, 1, 5)
            r.block_table = t
            decodes.append(r)
        eager = Admission(pool, [r.block_table for r in decodes])
        lazy = Admission(pool, (), 0.0, 0, decodes)
        wants = [(BlockTable([], 0), int(rng.integers(1, 4 * bs * 4))) for _ in range(6)]
        assert ([eager.try_admit(t, n) for t, n in wants]
                == [lazy.try_admit(t, n) for t, n in wants])
        assert eager.num_free_blocks == lazy.num_free_blocks


def test_steps_that_fit_for_a_request_without_its_blocks_yet() -> None:
    """A waiting request matched to a 64-token prefix hit holds no block yet: with one block
    free it cannot decode at all (4 blocks behind), whatever a shortcut for running decodes
    (which hold KV for every computed token) would say. Found by review."""
    r = RequestState(0, 0.0, 100, 50)
    r.num_computed_tokens = 64
    assert decode_steps_that_fit([r], 16, 16, 1) == 0
