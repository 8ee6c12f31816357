"""The cost model's coefficient tensor: every per-GPU quantity of every operation is linear in a
few per-iteration features of a plan, so the model is a fixed tensor [quantity, op, feature] built
once per replica shape; pricing a plan sums the features over layer segments and does one
tensor-vector product (costmodel/price.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from costmodel.model import ModelSpec

ACT_BYTES = 2.0  # activations stay bf16 whatever the weight format

# Operation rows: (name, class). Row order is the order kernels run in a layer.
OPS = (
    ("qkv_proj", "dense_gemm"),
    ("prefill_attn", "prefill_attn"),
    ("decode_attn", "decode_attn"),
    ("o_proj", "dense_gemm"),
    ("router", "dense_gemm"),
    ("experts", "expert_gemm"),
    ("shared_experts", "dense_gemm"),
    ("dense_mlp", "dense_gemm"),
    ("norms_elementwise", "elementwise"),
    ("allreduce", "allreduce"),
    ("alltoall", "alltoall"),
    ("lm_head", "dense_gemm"),
    ("embedding", "elementwise"),
)
_LINK_OPS = frozenset({"allreduce", "alltoall"})
_OP_INDEX = {name: i for i, (name, _) in enumerate(OPS)}
_EXPERTS = _OP_INDEX["experts"]
# The tensor's quantity axis, per GPU: FLOPs, bytes of dense weights, of expert weights, of KV
# read, of KV written, of activations, over the link, and kernel launches.
_QUANTITIES = ("flops", "wbytes", "xbytes", "kvr", "kvw", "act", "link", "launches")
_HBM = ("wbytes", "xbytes", "kvr", "kvw", "act")  # the quantities that are HBM traffic


class Features(NamedTuple):
    """A plan's features, summed over the layers it runs: the tensor's feature axis.

    Token work (tm, pf_pairs, pf_kv, pf_q, dec_kv, dec_q, logits, embed) is per expert-parallel
    attention group. Adding one: a field here, its coefficients in `coefficients`, its sum in
    CostModel._price_segments (at its position, named _X_* there)."""

    tm: float  # token-layers: tokens times the layers they pass
    nl: float  # layers that run any tile
    pf_pairs: float  # causal attention pairs of prefills (through the window on sliding layers)
    pf_kv: float  # KV tokens read by prefills
    pf_q: float  # prefill query-layers
    dec_kv: float  # KV tokens read by decodes
    dec_q: float  # decode query-layers
    expert_units: float  # experts read per GPU, summed over layers
    nl_pf: float  # layers with prefill work
    nl_dec: float  # layers with decode work
    logits: float  # tokens needing logits
    has_logits: float  # 1.0 when any token does, else 0.0
    embed: float  # embedded tokens
    has_embed: float  # 1.0 when any token is, else 0.0


FEATURES = Features._fields

# A plan's tiles summed over one range of layers: CostModel.price folds its tiles into lists of
# these fields per layer range, then sums the ranges over each segment of layers that run the
# same work; the features are sums of these over segments. SUM_* name the list positions.
LAYER_SUMS = (
    "tokens",  # every tile's tokens
    "pf_tokens",  # tokens of prefill tiles (more than one token)
    "pf_pairs",  # their causal attention pairs
    "pf_pairs_win",  # the same through the sliding window (0 without one)
    "pf_kv",  # KV tokens their attention reads
    "pf_kv_win",  # the same through the window
    "dec_tokens",  # single-token tiles
    "dec_kv",  # KV tokens they read: context + 1 each
    "dec_kv_win",  # the same, each capped at the window
    "pf_seqs",  # prefill tiles
)
SUM_TOKENS, SUM_PF_TOKENS, SUM_PF_SEQS = (LAYER_SUMS.index(f) for f in ("tokens", "pf_tokens", "pf_seqs"))
SUM_PF_PAIRS, SUM_PF_PAIRS_WIN = (LAYER_SUMS.index(f) for f in ("pf_pairs", "pf_pairs_win"))
SUM_PF_KV, SUM_PF_KV_WIN = (LAYER_SUMS.index(f) for f in ("pf_kv", "pf_kv_win"))
SUM_DEC_TOKENS, SUM_DEC_KV, SUM_DEC_KV_WIN = (LAYER_SUMS.index(f) for f in ("dec_tokens", "dec_kv",
                                                                           "dec_kv_win"))


def _kept_bytes(weight_bytes: float) -> float:
    """Bytes per parameter of the router, embeddings and LM head: quantised checkpoints keep
    them in bf16 (and the measured path prices them from the bf16 tables)."""
    return max(weight_bytes, ACT_BYTES)


def coefficients(m: ModelSpec, tp: int, ep: int, imb: float) -> np.ndarray:
    """The tensor [quantity, op, feature]; `imb` is the busiest expert group's load factor."""
    h, hd, wb, ewb, kvb, A = (m.hidden, m.head_dim, m.weight_bytes, m.expert_weight_bytes,
                              m.kv_bytes, ACT_BYTES)
    q_pg = m.q_dim // tp
    kv_pg = max(1, m.num_kv_heads // tp) * hd
    heads_pg = m.num_q_heads // tp
    inter_pg = m.expert_intermediate // tp
    K = np.zeros((len(_QUANTITIES), len(OPS), len(FEATURES)))

    def put(q: str, op: str, f: str, v: float) -> None:
        K[_QUANTITIES.index(q), _OP_INDEX[op], FEATURES.index(f)] += v

    put("flops", "qkv_proj", "tm", 2 * h * (q_pg + 2 * kv_pg))
    put("wbytes", "qkv_proj", "nl", h * (q_pg + 2 * kv_pg) * wb)
    put("act", "qkv_proj", "tm", (h + q_pg) * A)
    put("kvw", "qkv_proj", "tm", 2 * kv_pg * kvb)
    put("launches", "qkv_proj", "nl", 1)
    put("flops", "prefill_attn", "pf_pairs", 4 * heads_pg * hd)
    put("kvr", "prefill_attn", "pf_kv", 2 * kv_pg * kvb)
    put("act", "prefill_attn", "pf_q", 2 * q_pg * A)
    put("launches", "prefill_attn", "nl_pf", 1)
    put("flops", "decode_attn", "dec_kv", 4 * heads_pg * hd)
    put("kvr", "decode_attn", "dec_kv", 2 * kv_pg * kvb)
    put("act", "decode_attn", "dec_q", 2 * q_pg * A)
    put("launches", "decode_attn", "nl_dec", 1)
    put("flops", "o_proj", "tm", 2 * q_pg * h)
    put("wbytes", "o_proj", "nl", q_pg * h * wb)
    put("act", "o_proj", "tm", (q_pg + h) * A)
    put("launches", "o_proj", "nl", 1)
    if m.is_moe:
        E, k = m.num_experts, m.top_k
        put("flops", "router", "tm", 2 * h * E)
        put("wbytes", "router", "nl", h * E * _kept_bytes(wb))
        put("act", "router", "tm", (h + E) * A)
        put("launches", "router", "nl", 1)
        put("flops", "experts", "tm", 2 * k * 3 * h * inter_pg * imb)
        put("xbytes", "experts", "expert_units", 3 * h * inter_pg * ewb)
        put("act", "experts", "tm", k * imb * (2 * h + 3 * inter_pg) * A)
        put("launches", "experts", "nl", 1)
        put("act", "norms_elementwise", "tm", k * 3 * inter_pg * A)
        if m.shared_expert_intermediate:
            si = m.shared_expert_intermediate // tp
            put("flops", "shared_experts", "tm", 2 * 3 * h * si)
            put("wbytes", "shared_experts", "nl", 3 * h * si * wb)
            put("act", "shared_experts", "tm", (2 * h + 3 * si) * A)
            put("launches", "shared_experts", "nl", 1)
        if ep > 1:
            put("link", "alltoall", "tm", 2 * k * h * A * (ep - 1) / ep)
            put("launches", "alltoall", "nl", 2)
    else:
        di = m.dense_intermediate // tp
        put("flops", "dense_mlp", "tm", 2 * 3 * h * di)
        put("wbytes", "dense_mlp", "nl", 3 * h * di * wb)
        put("act", "dense_mlp", "tm", (2 * h + 3 * di) * A)
        put("launches", "dense_mlp", "nl", 1)
        put("act", "norms_elementwise", "tm", 3 * di * A)
    put("flops", "norms_elementwise", "tm", 10 * h)
    put("act", "norms_elementwise", "tm", 8 * h * A)
    put("launches", "norms_elementwise", "nl", 1)
    if tp > 1:
        put("link", "allreduce", "tm", 2 * 2 * (tp - 1) / tp * h * A)
        put("launches", "allreduce", "nl", 2)
    vocab_pg = m.vocab // tp
    put("flops", "lm_head", "logits", 2 * h * vocab_pg)
    put("wbytes", "lm_head", "has_logits", h * vocab_pg * _kept_bytes(wb))
    put("act", "lm_head", "logits", (h + vocab_pg) * A)
    put("launches", "lm_head", "has_logits", 1)
    put("act", "embedding", "embed", 2 * h * A)
    put("launches", "embedding", "has_embed", 1)
    return K
