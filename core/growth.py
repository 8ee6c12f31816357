"""KV blocks running decodes take as they grow: a replica's block arithmetic for decode steps.

A request holding KV and hidden-state blocks has room for (blocks x block_size -
num_computed_tokens) more tokens, and takes a block for every block_size tokens past that.
`ReplicaState.decode_growth` and `ReplicaState.decode_steps_that_fit` answer with these
functions for the replica's block size and free blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from core.request import RequestState


def decode_growth(requests: Sequence[RequestState], steps: int, block_size: int) -> int:
    """Blocks `requests` take to decode `steps` more tokens each."""
    bs = block_size
    total = 0
    for r in requests:  # blocks_for(tokens) - num_blocks, inlined: this runs every iteration
        t = r.block_table
        grow = -(-(r.num_computed_tokens + steps) // bs) - len(t.block_ids) - len(t.extra_block_ids)
        if grow > 0:
            total += grow
    return total


def decode_steps_that_fit(requests: Sequence[RequestState], most: int, block_size: int,
                          free: int) -> int:
    """The largest j <= `most` such that every one of `requests` can decode j more tokens in
    `free` blocks. A request with room for r more tokens in the blocks it holds takes
    ceil((j - r) / block_size) blocks for j > r; growth only rises with j, so a binary
    search over j, each growth summed in numpy (this runs once per steady run)."""
    if not requests:
        return most
    bs = block_size
    rooms = [(len(r.block_table.block_ids) + len(r.block_table.extra_block_ids)) * bs
             - r.num_computed_tokens for r in requests]
    if len(rooms) <= 32:  # a small batch: plain ints cost less than numpy's calls
        def small_growth(j: int) -> int:
            return sum(-((room - j) // bs) for room in rooms if room < j)  # ceil((j - room) / bs)
        return most_that_fit(small_growth, most, free)
    room = np.array(rooms, dtype=np.int64)

    def growth(j: int) -> int:
        return int(np.maximum(0, -((room - j) // bs)).sum())  # sum of ceil((j - room) / bs)+

    return most_that_fit(growth, most, free)


def most_that_fit(growth: Callable[[int], int], most: int, free: int) -> int:
    """The largest j <= `most` with growth(j) <= `free` blocks, for a growth that only rises
    with j (0 if none fits): binary search, trying `most` first (it mostly fits)."""
    if growth(most) <= free:
        return most
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if growth(mid) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo
