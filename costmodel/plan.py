"""Work tiles: the one vocabulary every policy speaks and every executor consumes.

A tile is a rectangle of work for one request: tokens [t0, t1) through layers [l0, l1), with
`num_cached` tokens of that request's context already in the KV cache of those layers.
A decode is (r, [n, n+1), [0, L)); a 512-token chunk is (r, [a, a+512), [0, L)); a layered
step is (r, [0, P), [l0, l1)). `logits` marks the tiles whose last token goes through the LM
head: every decode and the tile that finishes a prompt's last layer.
"""

from __future__ import annotations

from typing import NamedTuple


class Tile(NamedTuple):
    # A NamedTuple, not a dataclass: policies build tens of tiles per iteration and the
    # simulator prices millions of iterations, so construction cost matters. It is immutable.
    req_id: int
    t0: int
    t1: int
    l0: int
    l1: int
    num_cached: int
    logits: bool = False

    @property
    def num_tokens(self) -> int:
        return self.t1 - self.t0

    @property
    def num_layers(self) -> int:
        return self.l1 - self.l0


Plan = tuple[Tile, ...]
"""The tiles of one iteration. Tiles of one request never overlap in (token, layer)."""


_new_tile = tuple.__new__  # NamedTuple's own __new__ adds a Python call per tile


def decode_tile(req_id: int, num_computed_tokens: int, num_layers: int) -> Tile:
    return _new_tile(Tile, (req_id, num_computed_tokens, num_computed_tokens + 1, 0, num_layers,
                            num_computed_tokens, True))
