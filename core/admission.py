"""What a replica can hold, and which requests it can never serve.

`kv_blocks`: one replica's KV blocks, (HBM x utilization - weights - activation reserve) /
(block bytes) per GPU (with ep attention groups each group holds its own cache), and the blocks
one token's hidden state takes at a part-way prompt's layer frontier.

`screen`: a request is rejected before it is served, as vLLM rejects it, when its prompt alone
or its prompt and output together exceed the model's context, or when at its peak it needs more
KV blocks than the whole replica has (hidden states of a part-way prompt included); the first
reason that applies is counted (REJECTIONS). Both executors screen with this one function, so a
trace loses the same requests for the same reasons in the simulator and on the engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.blocks import peak_blocks
from costmodel.errors import ConfigError

if TYPE_CHECKING:
    from costmodel.price import CostModel
    from traces.request import Request

# metric key -> why such a request never runs (the first that applies; context: the model's,
# KV cache: one replica's, hidden states included)
REJECTIONS = {
    "rejected_prompt_over_context": "prompt > context",
    "rejected_prompt_output_over_context": "prompt + output > context",
    "rejected_over_kv_cache": "KV cache too small",
}
ACTIVATION_RESERVE = 0.05  # of HBM, kept for activations unless the caller says otherwise


def kv_blocks(cost_model: CostModel, block_size: int, gpu_memory_utilization: float,
              activation_reserve_bytes: float | None = None) -> tuple[int, float]:
    """KV blocks one replica holds, and blocks per token of a part-way prompt's hidden state
    (see the module note). The reserve defaults to ACTIVATION_RESERVE of HBM."""
    hw, m, par = cost_model.hw, cost_model.model, cost_model.parallel
    reserve = (ACTIVATION_RESERVE * hw.hbm_bytes if activation_reserve_bytes is None
               else activation_reserve_bytes)
    free = hw.hbm_bytes * gpu_memory_utilization - cost_model.weight_bytes_per_gpu - reserve
    per_block = block_size * cost_model.kv_bytes_per_token_per_gpu
    blocks = math.floor(free / per_block) * par.ep
    hidden_per_token = m.hidden * 2.0  # bf16 hidden state, replicated on every TP rank
    return max(0, blocks), hidden_per_token / per_block


@dataclass(frozen=True)
class Screening:
    """Requests split into those a replica can serve and those it never can (each with the
    REJECTIONS key saying why), both in the order given."""

    servable: list[Request]
    rejected: list[Request]
    reasons: dict[int, str]  # req_id -> REJECTIONS key

    def counts(self) -> dict[str, int]:
        """Rejections by reason: every REJECTIONS key, in its order, zero or not."""
        found = list(self.reasons.values())
        return {key: found.count(key) for key in REJECTIONS}

    def texts(self) -> dict[int, str]:
        """req_id -> why it never ran, in words (SimResult.rejections)."""
        return {rid: REJECTIONS[key] for rid, key in self.reasons.items()}


def rejection(prompt_tokens: int, output_tokens: int, max_context: int, num_blocks: int,
              block_size: int, hidden_blocks_per_token: float) -> str | None:
    """The REJECTIONS key of a request that can never run here; None when it fits."""
    if prompt_tokens > max_context:
        return "rejected_prompt_over_context"
    if prompt_tokens + output_tokens > max_context:
        return "rejected_prompt_output_over_context"
    if peak_blocks(prompt_tokens, output_tokens, block_size, hidden_blocks_per_token) > num_blocks:
        return "rejected_over_kv_cache"
    return None


def screen(requests: Sequence[Request], cost_model: CostModel, num_blocks: int, block_size: int,
           hidden_blocks_per_token: float) -> Screening:
    """Split `requests` (see the module note) for replicas of `num_blocks` KV blocks serving
    `cost_model`'s model. A replica with no KV blocks, or requests none of which fits, are a
    ConfigError: there is nothing to serve."""
    model = cost_model.model
    if num_blocks <= 0:
        raise ConfigError(f"no memory left for the KV cache: {model.name} on "
                          f"{cost_model.parallel.num_gpus} x {cost_model.hw.name}")
    servable: list[Request] = []
    rejected: list[Request] = []
    reasons: dict[int, str] = {}
    for r in requests:
        why = rejection(r.prompt_tokens, r.output_tokens, model.max_context, num_blocks,
                        block_size, hidden_blocks_per_token)
        if why is None:
            servable.append(r)
        else:
            rejected.append(r)
            reasons[r.req_id] = why
    if requests and not servable:
        counts = Screening(servable, rejected, reasons).counts()
        why = ", ".join(f"{REJECTIONS[k]}: {n}" for k, n in counts.items() if n)
        raise ConfigError(f"nothing can be served: all {len(requests)} requests are rejected "
                          f"({why}); {model.name}'s context is {model.max_context} tokens, one "
                          f"replica's KV cache {num_blocks * block_size} tokens")
    return Screening(servable, rejected, reasons)
