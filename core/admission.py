"""What a replica can hold, and which requests it can never serve.

`kv_blocks`: one replica's KV blocks, (HBM x utilization - weights - activation reserve) /
(block bytes) per GPU (with ep attention groups each group holds its own cache), and the blocks
one token's hidden state takes at a part-way prompt's layer frontier.

`screen`: a request is rejected before it is served, as vLLM rejects it, when its prompt alone
or its prompt and output together exceed the model's context, or when at its peak it needs more
KV blocks than the whole replica has (hidden states of a part-way prompt included); the first
reason that applies is counted (REJECTIONS). Both executors screen with this one function, so a
trace loses the same requests for the same reasons in the simulator and on the engine.

`Admission`: what a replica can hold now, one schedule call's view of its `core.blocks.BlockPool`
pricing admissions and growth in blocks (the running decodes' next blocks reserved first).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from core.blocks import BlockPool, BlockTable, NoFreeBlocksError, hidden_state_blocks, peak_blocks
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


class HoldsBlocks(Protocol):
    """Anything that owns a block table (core.request.RequestState)."""

    @property
    def block_table(self) -> BlockTable: ...


def _num_growing(decodes: Iterable[BlockTable], block_size: int) -> int:
    """Decodes whose next token starts a block (their last one is full)."""
    return sum(1 for t in decodes if t.num_tokens >= len(t.block_ids) * block_size)


def _table_of(owner: BlockTable | HoldsBlocks) -> BlockTable:
    return owner if isinstance(owner, BlockTable) else owner.block_table


class Admission:
    """One schedule call's view of the pool: prices admissions and growth without changing it.

    Created once per schedule call; it first reserves the running decodes' growth (a decode
    writes its next token at slot `num_tokens`, needing a block when the last one is full).
    A table's cost in blocks taken from `num_free_blocks`: cached prefix blocks held by running
    requests cost 0 (already resident), evictable ones 1 (they stop being free; 0 for a later
    request in the same call that hits the same block), fresh KV and extra blocks 1 each, less
    extra blocks the table gives back. Valid while the executor admits every new table of the
    plan (`BlockPool.admit`) before it allocates any, and allocates in plan order.

    Every method takes a block table or its owner (a RequestState): policies pass requests.

    The decodes' next blocks may be counted lazily (`uncounted`, ReplicaState.admission): each
    needs at most one, so while an admission fits with one reserved for every uncounted decode
    it fits whatever the count; only a closer call counts them (O(batch)), with the same answer."""

    __slots__ = ("pool", "hidden_blocks_per_token", "_reserved", "_claimed", "_uncounted")

    def __init__(self, pool: BlockPool, decodes: Iterable[BlockTable] = (),
                 hidden_blocks_per_token: float = 0.0, num_reserved_blocks: int = 0,
                 uncounted: Sequence[HoldsBlocks] = ()) -> None:
        """`decodes`' next blocks are reserved, plus `num_reserved_blocks` counted by the caller;
        `uncounted` decodes' next blocks are reserved too, counted only where it matters."""
        self.pool = pool
        self.hidden_blocks_per_token = hidden_blocks_per_token
        self._reserved = num_reserved_blocks + _num_growing(decodes, pool.block_size)
        self._uncounted = uncounted
        self._claimed: set[int] = set()  # evictable blocks a reserved admission will reference

    @property
    def num_reserved_blocks(self) -> int:
        """Blocks this call reserved: the decodes' next ones and the admissions'."""
        if self._uncounted:
            self._count()
        return self._reserved

    @num_reserved_blocks.setter
    def num_reserved_blocks(self, value: int) -> None:
        self._uncounted = ()
        self._reserved = value

    def _count(self) -> None:
        self._reserved += _num_growing((r.block_table for r in self._uncounted),
                                       self.pool.block_size)
        self._uncounted = ()

    @property
    def num_free_blocks(self) -> int:
        """Blocks still free after what this call reserved."""
        return self.pool.num_free_blocks - self.num_reserved_blocks

    def num_cached_tokens(self, owner: BlockTable | HoldsBlocks) -> int:
        """Where the table's prefill starts: its prefix hit (waiting) or what it has (admitted)."""
        return self.pool.match_prefix(_table_of(owner))

    def cost(self, owner: BlockTable | HoldsBlocks, num_tokens: int, partial: bool = False) -> int:
        return self._price(_table_of(owner), num_tokens, partial)[0]

    def can_admit(self, owner: BlockTable | HoldsBlocks, num_tokens: int,
                  partial: bool = False) -> bool:
        """Whether the table can hold `num_tokens` (plus hidden states if `partial`) beside what
        this call reserved already."""
        return self._price(_table_of(owner), num_tokens, partial)[0] <= self.num_free_blocks

    def reserve(self, owner: BlockTable | HoldsBlocks, num_tokens: int, partial: bool = False) -> None:
        if not self.try_admit(owner, num_tokens, partial):
            raise NoFreeBlocksError(f"{self.cost(owner, num_tokens, partial)} blocks needed for "
                                    f"{num_tokens} tokens, {self.num_free_blocks} left")

    def try_admit(self, owner: BlockTable | HoldsBlocks, num_tokens: int,
                  partial: bool = False) -> bool:
        """Reserve the table's blocks for `num_tokens` (plus hidden states if `partial`) if they
        fit; say whether they did."""
        table = owner if isinstance(owner, BlockTable) else owner.block_table
        pool = self.pool
        if partial or (table.num_cached_tokens < 0 and table.block_hashes and pool.ever_cached):
            cost, claim = self._price(table, num_tokens, partial)
        else:  # _price with no hit possible and no hidden states: KV growth alone
            cost = (-(-num_tokens // pool.block_size) - len(table.block_ids)
                    - len(table.extra_block_ids))
            if cost < 0:
                cost = 0
            claim = None
        if cost > pool.num_free_blocks - self._reserved - len(self._uncounted):
            if cost > self.num_free_blocks:  # counts the decodes' blocks first
                return False
        self._reserved += cost
        if claim:
            self._claimed.update(claim)
        return True

    def _price(self, table: BlockTable, num_tokens: int, partial: bool) -> tuple[int, list[int]]:
        pool = self.pool
        num_kv_held = len(table.block_ids)
        claim: list[int] = []
        # a waiting table can hit only once something is cached and if its content is known
        if table.num_cached_tokens < 0 and table.block_hashes and pool.ever_cached:
            hits = pool._match(table)
            num_kv_held = len(hits)
            refs, claimed = pool._refs, self._claimed
            claim = [b for b in hits if refs[b] == 0 and b not in claimed]
        num_extra = hidden_state_blocks(num_tokens, self.hidden_blocks_per_token) if partial else 0
        # A table's surplus extras are released before it grows (BlockPool.allocate), so they
        # offset its own growth; never credited to other tables, which may be allocated first.
        cost = (len(claim) + max(0, -(-num_tokens // pool.block_size) - num_kv_held)
                + num_extra - len(table.extra_block_ids))
        return max(0, cost), claim
