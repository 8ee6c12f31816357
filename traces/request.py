"""The unit of work every workload produces: one request with its arrival time and lengths.

`hash_ids`, when given, identify the prompt's content block by block, `hash_block_size` tokens
each (Mooncake's trace: 512): two requests whose ids agree up to a block share the prompt up
to that block's end, which is what prefix caching reuses (core/blocks.py trace_block_hashes
maps them onto the replica's KV blocks). Without them a request's content is unknown and
never shared.
"""

from __future__ import annotations

from dataclasses import dataclass

MOONCAKE_BLOCK_SIZE = 512  # tokens per hash id in Mooncake's traces


@dataclass(frozen=True, slots=True)
class Request:
    req_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    hash_block_size: int = MOONCAKE_BLOCK_SIZE
