"""The replica state policies read: a re-export of core/state.py, core/legality.py and
core/request.py.

The state and its requests live in `core` (shared by the simulator and the engine, no SimPy, no
torch); user policies written against `policies.state` keep working unchanged.
"""

from core.blocks import blocks_needed
from core.legality import PlanError, as_tile
from core.request import RequestState
from core.state import ReplicaState

__all__ = ["PlanError", "ReplicaState", "RequestState", "as_tile", "blocks_needed"]
