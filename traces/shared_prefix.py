"""A synthetic shared-prefix workload: N system prompts shared by many requests, each request
its own question after one of them (chat and agent traffic, where prefix caching decides).

Spec ``shared-prefix:NUM_PROMPTS:PREFIX_LEN:QUESTION_LEN:OUTPUT_LEN``: every request has
PREFIX_LEN + QUESTION_LEN prompt tokens and OUTPUT_LEN output tokens; its system prompt is
drawn uniformly from the N with the workload's length generator (so deterministically from the
seed, independent of the arrivals). Content is expressed as trace hash ids at a block size of
PREFIX_LEN tokens: id s (< N) for system prompt s, then the request's own id (N + index) for
every later PREFIX_LEN-token block. Two requests therefore share exactly the KV blocks wholly
inside their common system prompt (core/blocks.py trace_block_hashes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traces._checks import MAX_TOKENS, shown
from traces.errors import TraceError

PREFIX = "shared-prefix:"
SPEC = "shared-prefix:NUM_PROMPTS:PREFIX_LEN:QUESTION_LEN:OUTPUT_LEN"
MAX_PROMPTS = 1_000_000


@dataclass(frozen=True)
class SharedPrefixLengths:
    num_prompts: int
    prefix_len: int
    question_len: int
    output_len: int

    def __post_init__(self) -> None:
        for label, value, top in (("NUM_PROMPTS", self.num_prompts, MAX_PROMPTS),
                                  ("PREFIX_LEN", self.prefix_len, MAX_TOKENS),
                                  ("QUESTION_LEN", self.question_len, MAX_TOKENS),
                                  ("OUTPUT_LEN", self.output_len, MAX_TOKENS)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise TraceError(f"shared-prefix {label} must be an integer from 1 to {top:,}, "
                                 f"got {shown(value)}")
        if self.prefix_len + self.question_len > MAX_TOKENS:
            raise TraceError(f"shared-prefix prompts (PREFIX_LEN + QUESTION_LEN) must be at most "
                             f"{MAX_TOKENS:,} tokens")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return (np.full(n, self.prefix_len + self.question_len, dtype=np.int64),
                np.full(n, self.output_len, dtype=np.int64))

    def hash_ids(self, n: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
        """Each request's prompt block ids (see the module note), system prompts from `rng`."""
        prompts = rng.integers(0, self.num_prompts, size=n).tolist()
        tail = -(-self.question_len // self.prefix_len)  # own blocks after the system prompt
        return [(s, *(self.num_prompts + i,) * tail) for i, s in enumerate(prompts)]

    def describe(self) -> str:
        return (f"shared prefix: {self.num_prompts} system prompts of {self.prefix_len} tokens, "
                f"{self.question_len}-token questions, {self.output_len} output tokens")


def parse_shared_prefix(spec: str) -> SharedPrefixLengths:
    """Parse ``SPEC`` (e.g. ``'shared-prefix:8:2048:256:128'``)."""
    parts = spec.split(":")
    if len(parts) != 5 or parts[0] + ":" != PREFIX:
        raise TraceError(f"shared-prefix workload must look like {SPEC!r}, got {shown(spec)}")
    try:
        n, prefix, question, output = (int(p) for p in parts[1:])
    except ValueError:
        raise TraceError(f"shared-prefix workload numbers must be integers, got {shown(spec)}") from None
    return SharedPrefixLengths(n, prefix, question, output)
