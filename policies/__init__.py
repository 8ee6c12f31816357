"""Scheduling policies: pure functions from a replica's state to the tiles of one iteration."""

from core.request import RequestState
from core.state import PlanError, ReplicaState
from policies.base import Policy, decode_tiles, prompt_tile
from policies.chunked import ChunkedPrefill
from policies.layered import LayeredPrefill, group_bounds, num_groups
from policies.prefill_first import PrefillFirst
from policies.registry import make_policy

__all__ = ["Policy", "decode_tiles", "prompt_tile", "ChunkedPrefill", "LayeredPrefill",
           "group_bounds", "num_groups", "PrefillFirst", "make_policy", "PlanError",
           "ReplicaState", "RequestState"]
