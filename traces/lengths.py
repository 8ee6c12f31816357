"""Prompt/output length samplers: empirical table, fixed, and the ``arxiv-long`` preset.

* ``TableLengths``: draws rows of a ``LengthTable`` uniformly with replacement (one
  ``rng.integers`` call), keeping each (prompt, output) pair together.
* ``FixedLengths``: every request has the same lengths; spec string ``fixed:PROMPT:OUTPUT``.
* ``LogNormalLengths`` / ``arxiv_long``: independent log-normal prompt and output lengths, each
  fitted to a median m and p90 q as ``mu = ln m``, ``sigma = (ln q - ln m) / 1.2816`` (1.2816 is
  the standard normal 0.9 quantile), rounded to integers; prompts clipped to
  ``[1, max_context - output]`` (default 16,384) so prompt and output fit the context,
  outputs clipped to ``[1, max_context - 1]``.

Source of the ``arxiv-long`` quantiles: the "Long-document summarization" section of
``shared/traces/README.md`` - published arXiv-summarization statistics filtered to at most
16,384 tokens: prompt median 7,059 / p90 12,985 tokens, output median 208 / p90 371 tokens.
Clipping at 16,384 affects only the top ~4% of prompts, so median and p90 are preserved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from traces._checks import MAX_TOKENS, shown
from traces.errors import TraceError
from traces.loaders import LengthTable

Z90 = 1.2816
ARXIV_LONG_PROMPT = (7059.0, 12985.0)  # (median, p90) prompt tokens
ARXIV_LONG_OUTPUT = (208.0, 371.0)  # (median, p90) output tokens
DEFAULT_MAX_CONTEXT = 16384


class LengthSampler(Protocol):
    """Anything that returns ``n`` (prompt, output) int64 length pairs from ``rng``."""

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> str: ...


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TraceError(f"sample size must be a non-negative integer, got {n!r}")


@dataclass(frozen=True)
class TableLengths:
    """Uniform resampling (with replacement) of the rows of a ``LengthTable``."""

    table: LengthTable

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _check_n(n)
        rows = rng.integers(0, len(self.table), size=n)
        return self.table.prompt_tokens[rows], self.table.output_tokens[rows]

    def describe(self) -> str:
        return f"lengths resampled from {self.table.source} ({len(self.table)} rows)"


@dataclass(frozen=True)
class FixedLengths:
    """Every request has ``prompt`` prompt tokens and ``output`` output tokens."""

    prompt: int
    output: int

    def __post_init__(self) -> None:
        for label, value in (("prompt", self.prompt), ("output", self.output)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TraceError(f"fixed {label} length must be a positive integer: "
                                 f"{shown(value)}")
            if value > MAX_TOKENS:
                raise TraceError(f"fixed {label} length must be at most {MAX_TOKENS:,} tokens: "
                                 f"{shown(value)}")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _check_n(n)
        return np.full(n, self.prompt, dtype=np.int64), np.full(n, self.output, dtype=np.int64)

    def describe(self) -> str:
        return f"fixed {self.prompt} prompt / {self.output} output tokens"


def parse_fixed(spec: str) -> FixedLengths:
    """Parse ``'fixed:PROMPT:OUTPUT'`` (e.g. ``'fixed:1024:128'``)."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "fixed":
        raise TraceError(f"fixed workload must look like 'fixed:PROMPT:OUTPUT', "
                         f"got {shown(spec)}")
    try:
        prompt, output = int(parts[1]), int(parts[2])
    except ValueError:
        raise TraceError(f"fixed workload lengths must be integers, got {shown(spec)}") from None
    return FixedLengths(prompt, output)


def lognormal_params(median: float, p90: float) -> tuple[float, float]:
    """(mu, sigma) of the log-normal with the given median and 90th percentile."""
    if not (0 < median < p90):
        raise TraceError(f"need 0 < median < p90, got median={median!r}, p90={p90!r}")
    return math.log(median), (math.log(p90) - math.log(median)) / Z90


@dataclass(frozen=True)
class LogNormalLengths:
    """Independent log-normal prompt and output lengths fitted to (median, p90) pairs."""

    name: str
    prompt_median: float
    prompt_p90: float
    output_median: float
    output_p90: float
    max_context: int = DEFAULT_MAX_CONTEXT

    def __post_init__(self) -> None:
        lognormal_params(self.prompt_median, self.prompt_p90)
        lognormal_params(self.output_median, self.output_p90)
        mc = self.max_context
        if isinstance(mc, bool) or not isinstance(mc, int) or mc < 1:
            raise TraceError(f"max_context must be a positive integer, got {mc!r}")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _check_n(n)
        p_mu, p_sigma = lognormal_params(self.prompt_median, self.prompt_p90)
        o_mu, o_sigma = lognormal_params(self.output_median, self.output_p90)
        prompt = np.rint(rng.lognormal(p_mu, p_sigma, size=n))
        output = np.rint(rng.lognormal(o_mu, o_sigma, size=n))
        # prompt + output must fit the context: outputs keep their draw (capped), prompts give way
        output = np.clip(output, 1, max(1, self.max_context - 1)).astype(np.int64)
        prompt = np.clip(prompt, 1, np.maximum(1, self.max_context - output)).astype(np.int64)
        return prompt, output

    def describe(self) -> str:
        return (
            f"{self.name} (log-normal, median {self.prompt_median:g} / p90 "
            f"{self.prompt_p90:g} prompt tokens)"
        )


def arxiv_long(max_context: int = DEFAULT_MAX_CONTEXT) -> LogNormalLengths:
    """The long-document summarization preset (see the module docstring for its source)."""
    return LogNormalLengths(
        name="arxiv-long",
        prompt_median=ARXIV_LONG_PROMPT[0],
        prompt_p90=ARXIV_LONG_PROMPT[1],
        output_median=ARXIV_LONG_OUTPUT[0],
        output_p90=ARXIV_LONG_OUTPUT[1],
        max_context=max_context,
    )
