"""layersim's cost model: price one scheduler iteration of an LLM on given hardware (no torch)."""

from costmodel.cost import HbmBytes, IterationCost, OpCost, Parallelism
from costmodel.errors import ConfigError
from costmodel.experts import ExpertActivation, uniform_distinct
from costmodel.gpu import GPUS, GPUSpec, load_gpu
from costmodel.model import ModelSpec, list_presets, load_model, parse_config
from costmodel.plan import Plan, Tile, decode_tile
from costmodel.price import CostModel
from costmodel.profile import (
                               OP_CLASSES,
                               SCHEMA_VERSION,
                               EnergyParams,
                               OpParams,
                               Profile,
                               default_profile,
                               load_profile,
                               resolve_profile,
                               save_profile,
)

__all__ = [
    "ConfigError", "ExpertActivation", "uniform_distinct", "GPUS", "GPUSpec", "load_gpu",
    "ModelSpec", "list_presets", "load_model", "parse_config", "Plan", "Tile", "decode_tile",
    "CostModel", "HbmBytes", "IterationCost", "OpCost", "Parallelism", "OP_CLASSES",
    "SCHEMA_VERSION", "EnergyParams", "OpParams", "Profile", "default_profile", "load_profile",
    "resolve_profile", "save_profile",
]
