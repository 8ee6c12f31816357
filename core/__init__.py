"""What the simulator and the engine share: one replica's serving core (no torch, no SimPy).

`core.request` (RequestState) and `core.state` (ReplicaState: check, apply, apply_steady,
preemption, the KV block counters): the state policies read and executors change.
`core.step`: the serving step both executors run (prepare, commit, apply_steady); it runs the
policies, so it imports `policies` and is not imported here. `core.admission`: KV blocks per
replica, the one rejection rule and the policy-facing `Admission`. `core.records`,
`core.metrics`, `core.result`: what a run records, its vLLM-named metrics and its result.
`core.blocks`: the KV block pool (block identity, reference counts, vLLM-style prefix caching),
per-request block tables and block hashes.
"""

from core.admission import Admission
from core.blocks import (
    ROOT_HASH,
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
from core.request import RequestState
from core.state import PlanError, ReplicaState

__all__ = ["ROOT_HASH", "Admission", "BlockHash", "BlockPool", "BlockTable", "NoFreeBlocksError",
           "PrefixCacheStats", "blocks_needed", "hidden_state_blocks", "peak_blocks",
           "shared_prefix_block_hashes", "token_block_hashes", "trace_block_hashes",
           "unique_block_hashes", "PlanError", "ReplicaState", "RequestState"]
