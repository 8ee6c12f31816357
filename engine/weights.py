"""Random weights for a ModelSpec, drawn on the target device from one seed (no downloads).

Every matrix is N(0, 1/fan_in), so activations keep about unit scale through the stack; norm
weights are one and the embedding is N(0, 1). Tensors are drawn directly on the device in the
engine's dtype by a generator seeded there: qwen3-30b-a3b's 61 GB of bf16 appear on a GPU in
seconds and never pass through host memory. Layouts follow nn.Linear ([out, in]); each layer's
experts are stacked as [E, out, in], whose transposed view [E, in, out] is the column-major
operand torch._grouped_mm takes on Hopper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from costmodel.experts import popularity
from costmodel.model import ModelSpec

# Qwen2-MoE leaves the top-k routing weights unnormalised; the other MoE families renormalise
# them (Qwen3's norm_topk_prob, Mixtral's and GPT-OSS's softmax over the chosen k).
_NO_TOPK_NORM = ("Qwen2MoeForCausalLM",)


SKEW_BIAS_SCALE = 0.5


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wqkv: torch.Tensor  # [(Hq + 2 Hkv) D, H]
    bqkv: torch.Tensor | None  # [(Hq + 2 Hkv) D]
    wo: torch.Tensor  # [H, Hq D]
    q_norm: torch.Tensor | None  # [D] (Qwen3's per-head RMSNorm on q and k)
    k_norm: torch.Tensor | None  # [D]
    mlp_norm: torch.Tensor  # [H]
    router: torch.Tensor | None = None  # [E, H]
    router_bias: torch.Tensor | None = None  # [E], only for a skewed router
    w_gate_up: torch.Tensor | None = None  # [E, 2I, H]
    w_down: torch.Tensor | None = None  # [E, H, I]
    shared_gate_up: torch.Tensor | None = None  # [2S, H]
    shared_down: torch.Tensor | None = None  # [H, S]
    shared_gate: torch.Tensor | None = None  # [1, H]
    dense_gate_up: torch.Tensor | None = None  # [2F, H]
    dense_down: torch.Tensor | None = None  # [H, F]


@dataclass
class ModelWeights:
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)
    qk_norm: bool
    norm_topk: bool

    @property
    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        tensors = [self.embed, self.final_norm, self.lm_head]
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if isinstance(t, torch.Tensor)]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (the model's serving dtype), fp32 on the CPU (what its BLAS is fast at)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def init_weights(spec: ModelSpec, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 seed: int = 0, routing_skew: float = 0.0) -> ModelWeights:
    """Random weights; `routing_skew` > 0 biases each layer's router towards the cost model's
    log-normal expert popularity (costmodel/experts.py), hot experts shuffled per layer.

    Random router weights give logits ~ N(0, 1) per expert (RMS-normed input, std H^-1/2
    weights), so top-k is close to uniform. Adding SKEW_BIAS_SCALE * log p_i makes the top-k
    inclusion rates follow p: 0.5 matches the cost model's expected distinct experts within about
    5% for 8 to 128 experts at skews 0.9-1.5 (Monte Carlo in tests/test_engine.py)."""
    dev = torch.device(device)
    dt = dtype or default_dtype(dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.empty(shape, device=dev, dtype=dt).normal_(0.0, std, generator=gen)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=dev, dtype=dt)

    H, D = spec.hidden, spec.head_dim
    qkv_out = spec.q_dim + 2 * spec.kv_dim
    qk_norm = spec.architecture.startswith("Qwen3")
    layers = []
    for _ in range(spec.num_layers):
        lw = LayerWeights(
            attn_norm=ones(H),
            wqkv=rand(qkv_out, H, std=H ** -0.5),
            bqkv=rand(qkv_out, std=0.02) if spec.attention_bias else None,
            wo=rand(H, spec.q_dim, std=spec.q_dim ** -0.5),
            q_norm=ones(D) if qk_norm else None,
            k_norm=ones(D) if qk_norm else None,
            mlp_norm=ones(H),
        )
        if spec.is_moe:
            E, inter = spec.num_experts, spec.expert_intermediate
            lw.router = rand(E, H, std=H ** -0.5)
            if routing_skew > 0:
                log_p = torch.tensor(popularity(E, routing_skew), dtype=torch.float64).log()
                perm = torch.randperm(E, generator=gen, device=dev).cpu()
                lw.router_bias = (SKEW_BIAS_SCALE * log_p[perm]).to(device=dev, dtype=dt)
            lw.w_gate_up = rand(E, 2 * inter, H, std=H ** -0.5)
            lw.w_down = rand(E, H, inter, std=inter ** -0.5)
            if spec.shared_expert_intermediate:
                S = spec.shared_expert_intermediate
                lw.shared_gate_up = rand(2 * S, H, std=H ** -0.5)
                lw.shared_down = rand(H, S, std=S ** -0.5)
                lw.shared_gate = rand(1, H, std=H ** -0.5)
        else:
            F = spec.dense_intermediate
            lw.dense_gate_up = rand(2 * F, H, std=H ** -0.5)
            lw.dense_down = rand(H, F, std=F ** -0.5)
        layers.append(lw)
    embed = rand(spec.vocab, H, std=1.0)
    lm_head = embed if spec.tie_embeddings else rand(spec.vocab, H, std=H ** -0.5)
    return ModelWeights(spec=spec, device=dev, dtype=dt, embed=embed, layers=layers,
                        final_norm=ones(H), lm_head=lm_head, qk_norm=qk_norm,
                        norm_topk=spec.architecture not in _NO_TOPK_NORM)
