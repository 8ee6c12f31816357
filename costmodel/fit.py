"""Whether a model fits a replica: the parallelism divides its shapes, its weights fit in HBM.

Weights per GPU: attention and dense MLP split over tp, experts over ep groups of tp GPUs,
the embedding over tp; the KV cache per token and GPU holds the KV heads a GPU keeps (at
least one) in every layer.
"""

from __future__ import annotations

from costmodel.coefficients import _kept_bytes
from costmodel.cost import Parallelism
from costmodel.errors import ConfigError
from costmodel.gpu import GPUSpec
from costmodel.model import ModelSpec

WEIGHT_HEADROOM = 0.95  # weights must fit in this share of HBM


def check_parallelism(m: ModelSpec, parallel: Parallelism) -> None:
    """A ConfigError naming the flag unless tp and ep divide what they split."""
    tp, ep = parallel.tp, parallel.ep
    if tp < 1 or ep < 1:
        raise ConfigError(f"--tp and --ep must be >= 1, got tp={tp} ep={ep}")
    if m.num_q_heads % tp:
        raise ConfigError(f"--tp {tp} does not divide the {m.num_q_heads} attention heads of {m.name}")
    if m.num_kv_heads % tp and tp % m.num_kv_heads:
        raise ConfigError(f"--tp {tp} and the {m.num_kv_heads} KV heads of {m.name} do not divide")
    inter = m.expert_intermediate or m.dense_intermediate
    if inter % tp:
        raise ConfigError(f"--tp {tp} does not divide the MLP width {inter} of {m.name}")
    if ep > 1 and not m.is_moe:
        raise ConfigError(f"--ep {ep}: {m.name} is a dense model, it has no experts to split")
    if ep > 1 and m.num_experts % ep:
        raise ConfigError(f"--ep {ep} does not divide the {m.num_experts} experts of {m.name}")


def weight_bytes_per_gpu(m: ModelSpec, parallel: Parallelism) -> float:
    tp, ep = parallel.tp, parallel.ep
    kv_dim_pg = max(1, m.num_kv_heads // tp) * m.head_dim
    attn = m.hidden * (2 * m.q_dim // tp + 2 * kv_dim_pg)
    dense = m.num_layers * (attn + m.dense_mlp_params_per_layer // tp)
    experts = m.num_layers * (m.num_experts // ep) * m.expert_params // tp
    return (dense * m.weight_bytes + experts * m.expert_weight_bytes
            + m.embedding_params // tp * _kept_bytes(m.weight_bytes))


def kv_bytes_per_token_per_gpu(m: ModelSpec, parallel: Parallelism) -> float:
    return 2.0 * max(1, m.num_kv_heads // parallel.tp) * m.head_dim * m.kv_bytes * m.num_layers


def check_memory(m: ModelSpec, parallel: Parallelism, hw: GPUSpec) -> None:
    """A ConfigError unless the weights fit in WEIGHT_HEADROOM of each GPU's HBM."""
    need = weight_bytes_per_gpu(m, parallel)
    have = hw.hbm_bytes * WEIGHT_HEADROOM
    if need > have:
        raise ConfigError(
            f"{m.name} does not fit: {need / 1e9:.1f} GB of weights per GPU with "
            f"tp={parallel.tp} ep={parallel.ep}, {hw.name} has "
            f"{hw.hbm_bytes / 1e9:.0f} GB; raise --tp or --ep"
        )
