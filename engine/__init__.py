"""layersim's real engine: a random-weight PyTorch MoE transformer that executes policy plans.

Modules: weights (seeded random weights on the device), layers (RMSNorm, RoPE, MoE with a
grouped GEMM), kvcache (paged KV pool), attention (varlen FlashAttention or SDPA over the
pages), executor (`Engine.execute(plan)`, layer-major), reference (`reference_forward`, a plain
full-sequence forward for tests), serve (the wall-clock serving loop), validate and cli
(`layersim validate`). Importing this package does not import torch; its modules do.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Engine", "reference_forward", "serve", "validate", "validate_main"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from engine.executor import Engine
        return Engine
    if name == "reference_forward":
        from engine.reference import reference_forward
        return reference_forward
    if name == "serve":
        from engine.serve import serve
        return serve
    if name == "validate":
        from engine.validate import validate
        return validate
    if name == "validate_main":
        from engine.cli import validate_main
        return validate_main
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
