"""What pricing returns: a replica's parallelism and one iteration's cost, with its breakdown."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Parallelism:
    tp: int = 1
    ep: int = 1

    @property
    def num_gpus(self) -> int:
        return self.tp * self.ep


class HbmBytes(NamedTuple):
    dense_weights: float
    expert_weights: float
    kv_read: float
    kv_write: float
    activations: float

    @property
    def total(self) -> float:
        return sum(self)


class OpCost(NamedTuple):
    name: str
    op_class: str  # one of profile.OP_CLASSES, or "host" for the host_overhead row
    flops: float  # per GPU
    hbm_bytes: float  # per GPU
    link_bytes: float  # per GPU
    time_s: float
    bound: str  # "compute" | "memory" | "link" | "overhead"


class IterationCost(NamedTuple):
    """One iteration's price. Totals are for the whole replica; `ops` is per GPU.

    A NamedTuple because the simulator builds one per iteration; the per-layer expert counts
    and the per-operation breakdown are expanded only when asked for.
    """

    latency_s: float
    energy_j: float
    flops: float
    hbm_bytes: HbmBytes
    link_bytes: float
    num_gpus: int
    decode_tokens: int  # whole-stack decodes in the plan
    prefill_tokens: int  # tokens of every other tile
    prefill_layer_tokens: int  # those tokens times the layers they pass
    # (cost model, feature vector, ((l0, l1, expected distinct experts), ...), num_layers,
    #  the segments' stats when measured tables price the plan, else None)
    detail: tuple[Any, tuple[float, ...], tuple[tuple[int, int, float], ...], int, Any]

    @property
    def experts_touched_per_layer(self) -> tuple[float, ...]:
        """Expected distinct experts per layer (empty for a dense model)."""
        model, _, segments, num_layers, _ = self.detail
        if model is None or not model.model.is_moe:
            return ()
        out = [0.0] * num_layers
        for l0, l1, d in segments:
            out[l0:l1] = [d] * (l1 - l0)
        return tuple(out)

    @property
    def ops(self) -> tuple[OpCost, ...]:
        """Per-operation breakdown (per GPU)."""
        model, x, _, _, measured = self.detail
        return model.op_table(x, measured) if model is not None else ()  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "energy_j": self.energy_j,
            "flops": self.flops,
            "hbm_bytes": {**self.hbm_bytes._asdict(), "total": self.hbm_bytes.total},
            "link_bytes": self.link_bytes,
            "experts_touched_per_layer": list(self.experts_touched_per_layer),
            "num_gpus": self.num_gpus,
            "ops": [op._asdict() for op in self.ops],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())
