"""layersim's cost model: price one scheduler iteration of an LLM on given hardware (no torch).

The names below load on first use (PEP 562), so that `from costmodel import ConfigError`, which
every command needs for its errors, does not import numpy and pydantic: `layersim --help`
starts in a fraction of a second (tests/test_startup.py).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_MODULES = {
    "costmodel.cost": ("HbmBytes", "IterationCost", "OpCost", "Parallelism"),
    "costmodel.errors": ("ConfigError",),
    "costmodel.experts": ("ExpertActivation", "uniform_distinct"),
    "costmodel.gpu": ("GPUS", "GPUSpec", "load_gpu"),
    "costmodel.model": ("ModelSpec", "list_presets", "load_model", "parse_config"),
    "costmodel.plan": ("Plan", "Tile", "decode_tile"),
    "costmodel.price": ("CostModel",),
    "costmodel.profile": ("OP_CLASSES", "SCHEMA_VERSION", "EnergyParams", "OpParams", "Profile",
                          "default_profile", "load_profile", "resolve_profile", "save_profile"),
}

__all__ = [
    "ConfigError", "ExpertActivation", "uniform_distinct", "GPUS", "GPUSpec", "load_gpu",
    "ModelSpec", "list_presets", "load_model", "parse_config", "Plan", "Tile", "decode_tile",
    "CostModel", "HbmBytes", "IterationCost", "OpCost", "Parallelism", "OP_CLASSES",
    "SCHEMA_VERSION", "EnergyParams", "OpParams", "Profile", "default_profile", "load_profile",
    "resolve_profile", "save_profile",
]


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's `__getattr__` and `__dir__` (PEP 562) for names that load on first use:
    `modules` maps each submodule to the names it exports. Also used by `traces`."""
    home = {name: module for module, names in modules.items() for name in names}
    namespace = sys.modules[package].__dict__

    def getattr_(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home[name]), name)
        namespace[name] = value  # the next lookup is a plain one
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *home})
    return getattr_, dir_


__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
