"""The calibration grid: which shapes to time per operation class, and what the cost model counts.

Method. Shapes are drawn from one model at one TP size (dimensions divided as on one GPU of the
group). Each shape's FLOPs, HBM bytes and launches are not recomputed here: they are read from
the cost model itself (`CostModel.op_table` on a one-layer feature vector), so that a fit of the
timings recovers exactly the parameters the cost model applies. No torch in this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from costmodel import CostModel, GPUSpec, ModelSpec, Parallelism
from costmodel.price import FEATURES, OPS

OP_CLASS = dict(OPS)  # op name -> op class, as the cost model prices it

# A GPU big and fast enough that the cost model's memory check never refuses a model: we only
# want its FLOP and byte counts, which do not depend on the hardware.
_COUNTING_GPU = GPUSpec("counting", 1e15, 1e12, 1e18, 1e12, 1000.0, 0.0)


@dataclass(frozen=True)
class Shape:
    op: str  # a cost-model op name: qkv_proj, experts, decode_attn, ...
    params: dict[str, int] = field(hash=False)

    @property
    def op_class(self) -> str:
        return OP_CLASS[self.op]

    def label(self) -> str:
        return self.op + "(" + ",".join(f"{k}={v}" for k, v in self.params.items()) + ")"


@dataclass(frozen=True)
class Dims:
    """Per-GPU dimensions of one TP shard."""
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_inter: int
    shared_inter: int
    dense_inter: int
    vocab: int

    @classmethod
    def of(cls, m: ModelSpec, tp: int) -> Dims:
        return cls(hidden=m.hidden, q_heads=m.num_q_heads // tp, kv_heads=max(1, m.num_kv_heads // tp),
                   head_dim=m.head_dim, num_experts=m.num_experts, top_k=m.top_k,
                   expert_inter=m.expert_intermediate // tp,
                   shared_inter=m.shared_expert_intermediate // tp,
                   dense_inter=m.dense_intermediate // tp, vocab=m.vocab // tp)

    @property
    def q_dim(self) -> int:
        return self.q_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def counting_model(model: ModelSpec, tp: int) -> CostModel:
    """A cost model used only for its FLOP/byte/launch counts (raises ConfigError on a bad --tp)."""
    return CostModel(model, _COUNTING_GPU, parallel=Parallelism(tp=tp))


def features(shape: Shape, dims: Dims) -> dict[str, float]:
    """One layer's cost-model features for the work a shape times."""
    p = shape.params
    if shape.op == "experts":
        # e touched experts with t tokens each: e * t routed rows, i.e. e * t / k tokens.
        return {"tm": p["experts"] * p["tokens_per_expert"] / dims.top_k,
                "expert_units": p["experts"], "nl": 1}
    if shape.op == "prefill_attn":
        n, c = p["new"], p["cached"]
        return {"pf_pairs": (2 * c + n + 1) * n / 2, "pf_kv": c + n, "pf_q": n, "nl_pf": 1}
    if shape.op == "decode_attn":
        # `context` counts the new token too: the cost model reads c + 1 KV entries per decode.
        return {"dec_kv": p["batch"] * p["context"], "dec_q": p["batch"], "nl_dec": 1}
    if shape.op == "lm_head":
        return {"logits": p["tokens"], "has_logits": 1}
    if shape.op == "embedding":
        return {"embed": p["tokens"], "has_embed": 1}
    return {"tm": p["tokens"], "nl": 1}


def quantities(cm: CostModel, shape: Shape, dims: Dims) -> tuple[float, float, float, float]:
    """(flops, hbm_bytes, link_bytes, launches) the cost model charges for this shape."""
    f = features(shape, dims)
    x = tuple(float(f.get(name, 0.0)) for name in FEATURES)
    for row in cm.op_table(x):
        if row.name == shape.op:
            launches = 2.0 if shape.op_class in ("allreduce", "alltoall") else 1.0
            return row.flops, row.hbm_bytes, row.link_bytes, launches
    raise ValueError(f"the cost model prices no '{shape.op}' for this model")


def _dense_ops(m: ModelSpec) -> list[str]:
    ops = ["qkv_proj", "o_proj", "lm_head"]
    if m.is_moe:
        ops.append("router")
        if m.shared_expert_intermediate:
            ops.append("shared_experts")
    else:
        ops.append("dense_mlp")
    return ops


# Grid axes per device kind. GPU "full" is sized for an H200 (see scripts/gpu_calibrate.sh):
# ~100 shapes at ~0.1 s each plus ~50 energy windows of 0.3 s stays well under 3 minutes.
# CPU grids are small: a 2-core runner must finish `--quick` on tiny-moe in well under a minute.
_AXES: dict[tuple[str, bool], dict[str, list[int]]] = {
    ("cuda", False): dict(tokens=[1, 8, 32, 128, 512, 2048, 8192], experts=[1, 4, 16, 64, 128],
                          tpe=[1, 4, 16, 64, 256], new=[16, 128, 512, 2048, 8192],
                          cached=[0, 2048, 16384], batch=[1, 8, 32, 128, 256],
                          context=[256, 2048, 8192, 32768], elem=[1, 8, 64, 512, 4096, 16384]),
    ("cuda", True): dict(tokens=[1, 32, 512, 4096], experts=[1, 16, 128], tpe=[1, 16, 256],
                         new=[128, 2048], cached=[0, 8192], batch=[1, 32, 256],
                         context=[256, 4096, 32768], elem=[1, 512, 16384]),
    ("cpu", False): dict(tokens=[1, 4, 16, 64, 256, 1024], experts=[1, 2, 4, 8, 16],
                         tpe=[1, 4, 16, 64], new=[16, 64, 256, 1024], cached=[0, 256, 1024],
                         batch=[1, 4, 16, 64], context=[64, 256, 1024, 4096],
                         elem=[1, 16, 256, 2048]),
    # Up to 2048-token GEMMs and prefills: layered prefill runs whole prompts through a group,
    # and a fit that never saw them extrapolates badly. Decode contexts are whole 256-token
    # KV pages, since the engine reads whole pages.
    ("cpu", True): dict(tokens=[1, 8, 32, 128, 512, 2048], experts=[1, 2, 4, 8],
                        tpe=[1, 4, 16, 64, 256], new=[16, 64, 256, 512, 2048], cached=[0, 512],
                        batch=[1, 4, 16, 64], context=[256, 512, 1024, 2048],
                        elem=[1, 16, 128, 1024, 4096]),
}

MAX_DECODE_KV_TOKENS = 2 << 20  # batch * context cap: 8.6 GB of bf16 KV for Qwen3-30B at TP 1


def build_grid(model: ModelSpec, tp: int, device_kind: str, quick: bool) -> list[Shape]:
    """Shapes for every op class the cost model prices on one GPU (collectives excluded)."""
    ax = _AXES[(device_kind, quick)]
    grid: list[Shape] = []
    for op in _dense_ops(model):
        grid += [Shape(op, {"tokens": t}) for t in ax["tokens"]]
    if model.is_moe:
        for e in sorted({min(e, model.num_experts) for e in ax["experts"]}):
            grid += [Shape("experts", {"experts": e, "tokens_per_expert": t}) for t in ax["tpe"]]
    for c in ax["cached"]:
        grid += [Shape("prefill_attn", {"new": n, "cached": c}) for n in ax["new"]]
    for b in ax["batch"]:
        grid += [Shape("decode_attn", {"batch": b, "context": c}) for c in ax["context"]
                 if b * c <= MAX_DECODE_KV_TOKENS]
    grid += [Shape("norms_elementwise", {"tokens": t}) for t in ax["elem"]]
    grid += [Shape("embedding", {"tokens": t}) for t in sorted({*ax["elem"][::2], ax["elem"][-1]})]
    return grid


def grid_summary(grid: list[Shape]) -> dict[str, Any]:
    """Provenance: the shapes per class, compactly."""
    out: dict[str, Any] = {}
    for s in grid:
        out.setdefault(s.op_class, {}).setdefault(s.op, []).append(s.params)
    return out
