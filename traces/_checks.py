"""Bounds and message helpers shared by the trace readers (CSV, JSONL, JSON, dataset specs).

Bounds (stated in every message that enforces them):

* ``MAX_TOKENS`` = 10^9 tokens per prompt or output: a hundred times the longest context any
  model offers, yet small enough that token arithmetic downstream (squares of prompt lengths,
  bytes of KV cache) stays far inside int64. A larger count is a corrupt field, not a request.
* ``MAX_TIME_S`` = 10^10 s (about 317 years) for an arrival time, or for a trace's span when its
  timestamps are absolute (Azure): room for Unix-epoch seconds, nothing a simulation could mean
  beyond it.

Shown values are cut to ``SHOW_CHARS`` characters so that a 100,000-character field still gives
a one-line message of readable length.
"""

from __future__ import annotations

import json

MAX_TOKENS = 10**9
MAX_TIME_S = 1e10
TOKENS_BOUND = f"0 to {MAX_TOKENS:,} tokens"
SHOW_CHARS = 40


def shown(value: object) -> str:
    """``repr(value)``, cut to ``SHOW_CHARS`` characters (with '...') and safe for huge ints."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**SHOW_CHARS:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 3] + "..."


def json_problem(exc: BaseException) -> str:
    """A short, one-line reason why ``json.loads`` refused a text."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = str(exc)
    if "digits" in text:  # Python's int-from-string limit (sys.get_int_max_str_digits)
        return "a number with more than 4300 digits"
    return text.splitlines()[0] if text else type(exc).__name__


def is_blank(line: str) -> bool:
    """Whether a text line holds nothing but whitespace (skipped by every reader)."""
    return not line.strip()
