"""Replica-side machinery shared by the simulator, the policies and the engine (no torch, no SimPy).

`core.blocks`: the KV block pool (block identity, reference counts, vLLM-style prefix caching),
per-request block tables, block hashes and the policy-facing `Admission`.
"""

from core.blocks import (
    ROOT_HASH,
    Admission,
    BlockHash,
    BlockPool,
    BlockTable,
    NoFreeBlocksError,
    PrefixCacheStats,
    blocks_needed,
    hidden_state_blocks,
    peak_blocks,
    shared_prefix_block_hashes,
    token_block_hashes,
    trace_block_hashes,
    unique_block_hashes,
)

__all__ = ["ROOT_HASH", "Admission", "BlockHash", "BlockPool", "BlockTable", "NoFreeBlocksError",
           "PrefixCacheStats", "blocks_needed", "hidden_state_blocks", "peak_blocks",
           "shared_prefix_block_hashes", "token_block_hashes", "trace_block_hashes",
           "unique_block_hashes"]
