"""A request inside a replica: its prompt, its output so far, and its progress through the layers.

Progress is a staircase over layers: `layer_tokens[l]` tokens have passed layer l, never more in
a later layer than in an earlier one; while every layer stands at the same token (the usual
case) `layer_tokens` is None and `num_computed_tokens` says where. Preemption (recompute) folds
the output so far into the prompt to redo, so `num_prompt_tokens` and `max_tokens` may change;
`prompt_len` and `output_len` keep what arrived. Executors change a request only through
`core.state.ReplicaState`; policies only read it.

KV memory: every request owns a `core.blocks.BlockTable` (its block ids, and the chained hashes
of its prompt's full blocks when its content is known: token ids, a trace's hash ids, a shared
system prompt). `num_blocks` and `num_cached_tokens` read it. A waiting request's
`num_computed_tokens` is its prefix-cache hit as matched when the scheduler last looked at it
(core.state's module note), so its first tile starts at the first uncached token.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

from core.blocks import BlockHash, BlockTable, trace_block_hashes

if TYPE_CHECKING:
    from traces.request import Request


class RequestState:
    """One request inside a replica (see the module note)."""

    __slots__ = ("req_id", "arrival_s", "prompt_len", "output_len", "num_prompt_tokens",
                 "max_tokens", "num_output_tokens",
                 "num_computed_tokens", "layer_tokens", "block_table", "first_token_s",
                 "last_token_s", "finish_s", "num_preemptions", "itl_s", "admitted_s", "peak_work")

    def __init__(self, req_id: int, arrival_s: float, num_prompt_tokens: int, max_tokens: int,
                 block_hashes: Sequence[BlockHash] = ()):
        self.req_id = req_id
        self.arrival_s = arrival_s
        self.prompt_len = num_prompt_tokens  # as it arrived; preemption changes the fields below
        self.output_len = max_tokens
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens  # output tokens to generate
        self.num_output_tokens = 0
        self.num_computed_tokens = 0  # tokens through every layer
        self.layer_tokens: list[int] | None = None  # per layer, only while the stack is uneven
        self.block_table = BlockTable(list(block_hashes), num_prompt_tokens)
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.finish_s: float | None = None
        self.num_preemptions = 0
        # gaps between consecutive output tokens; a float array, copied in bulk by the simulator
        self.itl_s = array("d")
        self.admitted_s: float | None = None
        # the most token-layers it ever had computed when preempted (livelock detection)
        self.peak_work = 0

    # ---- what policies read -----------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """KV blocks it holds (shared prefix blocks included) plus hidden-state blocks."""
        return self.block_table.num_blocks

    @property
    def num_cached_tokens(self) -> int:
        """Its prefix-cache hit at admission (vLLM's name); -1 while waiting."""
        return self.block_table.num_cached_tokens

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens and self.layer_tokens is None

    @property
    def is_partial(self) -> bool:
        """Some layers are ahead of others (a layered or hybrid prefill in flight)."""
        return self.layer_tokens is not None

    @property
    def tokens_to_go(self) -> int:
        """Tokens still to compute through the whole stack (prompt, then every output token
        but the last, which no iteration feeds back): the jsq-tokens router's load."""
        return self.num_prompt_tokens + self.max_tokens - 1 - self.num_computed_tokens

    @property
    def num_prefill_remaining(self) -> int:
        return max(0, self.num_prompt_tokens - self.num_computed_tokens)

    def tokens_at(self, layer: int) -> int:
        lt = self.layer_tokens
        return self.num_computed_tokens if lt is None else lt[layer]

    def layers_done_at(self, num_tokens: int, num_layers: int) -> int:
        """How many leading layers have reached `num_tokens`."""
        lt = self.layer_tokens
        if lt is None:
            return num_layers if self.num_computed_tokens >= num_tokens else 0
        n = 0
        while n < num_layers and lt[n] >= num_tokens:
            n += 1
        return n

    @property
    def is_finished(self) -> bool:
        return self.num_output_tokens >= self.max_tokens

    def __repr__(self) -> str:
        return (f"RequestState(id={self.req_id}, prompt={self.num_prompt_tokens}, "
                f"computed={self.num_computed_tokens}, out={self.num_output_tokens}/{self.max_tokens})")


def request_state(r: Request, block_size: int, arrival_s: float | None = None) -> RequestState:
    """A trace request inside a replica of `block_size`-token KV blocks, its block hashes from
    the request's hash ids (none without them), arriving at `arrival_s` (default: its own)."""
    hashes = (trace_block_hashes(r.hash_ids, r.hash_block_size, r.prompt_tokens, block_size)
              if r.hash_ids else ())
    return RequestState(r.req_id, r.arrival_s if arrival_s is None else arrival_s,
                        r.prompt_tokens, r.output_tokens, hashes)
