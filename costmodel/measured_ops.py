"""The per-operation breakdown of a plan priced by measured kernel tables (costmodel/measured.py):
each operation's time, and what priced it. Only `explain` and `IterationCost.ops` ask; the
simulator's hot path prices with MeasuredKernels.latency_s, whose terms these are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from costmodel.coefficients import (
    SUM_DEC_KV,
    SUM_DEC_KV_WIN,
    SUM_DEC_TOKENS,
    SUM_PF_PAIRS,
    SUM_PF_PAIRS_WIN,
    SUM_PF_SEQS,
    SUM_PF_TOKENS,
    SUM_TOKENS,
)
from costmodel.measured import ACT_BYTES, MeasuredKernels, _seq_len_for_pairs


def measured_op_times_s(mk: MeasuredKernels, segments: Sequence[tuple[int, int, Sequence[int]]],
                       num_logits: int, embed_tokens: int) -> dict[str, float]:
    """latency_s's kernel terms by operation, for the breakdown."""
    prefix = mk._sliding_prefix
    times: dict[str, float] = {"lm_head": mk.lm_head_s(num_logits)}
    if embed_tokens:
        times["embedding"] = mk._embedding_s(embed_tokens / mk.ep)
    for l0, l1, s in segments:
        nl = l1 - l0
        n_slide = prefix[l1] - prefix[l0]
        for name, t in mk.layer_ops(s[SUM_TOKENS]).items():
            times[name] = times.get(name, 0.0) + nl * t
        if s[SUM_PF_TOKENS]:
            times["prefill_attn"] = times.get("prefill_attn", 0.0) + (
                (nl - n_slide) * mk.prefill_attn_s(s[SUM_PF_SEQS], s[SUM_PF_PAIRS])
                + n_slide * mk.prefill_attn_s(s[SUM_PF_SEQS], s[SUM_PF_PAIRS], s[SUM_PF_PAIRS_WIN]))
        if s[SUM_DEC_TOKENS]:
            times["decode_attn"] = times.get("decode_attn", 0.0) + (
                (nl - n_slide) * mk.decode_attn_s(s[SUM_DEC_TOKENS], s[SUM_DEC_KV])
                + n_slide * mk.decode_attn_s(s[SUM_DEC_TOKENS], s[SUM_DEC_KV], s[SUM_DEC_KV_WIN]))
    return times


def measured_op_sources(mk: MeasuredKernels, segments: Sequence[tuple[int, int, Sequence[int]]],
                        num_logits: int) -> dict[str, str]:
    """What priced each operation of this plan: `sources`, with "extrapolated" where this
    plan's size lies beyond the sizes the tables measured (the fitted roofline scales it)."""
    sizes: dict[str, list[float]] = {}

    def add(op: str, x: float) -> None:
        sizes.setdefault(op, []).append(x)
    for _, _, s in segments:
        per_group = math.ceil(s[SUM_TOKENS] / mk.ep)
        for op in (*mk._gemms, "norms_elementwise"):
            add(op, per_group)
        add("experts", s[SUM_TOKENS])
        add("allreduce", per_group * mk.model.hidden * ACT_BYTES)
        add("alltoall", per_group * mk.model.top_k * mk.model.hidden * ACT_BYTES)
        if s[SUM_PF_TOKENS]:
            add("prefill_attn", _seq_len_for_pairs(s[SUM_PF_PAIRS] / s[SUM_PF_SEQS]))
            add("prefill_attn_batch", math.ceil(s[SUM_PF_SEQS] / mk.ep))
        if s[SUM_DEC_TOKENS]:
            add("decode_attn", s[SUM_DEC_KV] / s[SUM_DEC_TOKENS])
            add("decode_attn_batch", math.ceil(s[SUM_DEC_TOKENS] / mk.ep))
    if num_logits:
        add("lm_head", math.ceil(num_logits / mk.ep))
    out = dict(mk.sources)
    for op, xs in sizes.items():
        lo, hi = mk._x_range.get(op, (0.0, math.inf))
        base = op.removesuffix("_batch")
        if base in out and out[base] == "table" and any(x < lo or x > hi for x in xs):
            out[base] = "extrapolated"
    return out
