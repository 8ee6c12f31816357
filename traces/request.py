"""The unit of work every workload produces: one request with its arrival time and lengths."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Request:
    req_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
