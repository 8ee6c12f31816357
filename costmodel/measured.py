"""Kernel times of one model on one replica, from a profile's measured tables.

Each kernel a decoder layer runs is mapped onto the table row shape that measures it:

- qkv, o_proj, router, shared expert and dense MLP (gate+up fused, then down) and the LM head:
  one dense GEMM each, m = the tokens a GPU computes, n and k from the weights it holds. The
  router and the LM head stay bf16 (fp8 checkpoints keep them so);
- the experts: vLLM's fused MoE layer for this model's shape, at inter/tp and experts/ep per GPU,
  for every token of the iteration, in the rows of the expert popularity nearest the routing
  skew (with ep, the tables measure the busiest rank's share, which sets the time);
- prefill attention: a batch of the plan's sequences, each of the length whose causal pairs are
  the plan's mean pairs per sequence (a 512-token chunk over 8,000 cached tokens computes as much
  as a 2,900-token prompt); sliding-window layers the same with their windowed pairs;
- decode attention: the plan's decodes at their mean context (windowed layers: capped context);
- two all-reduces per layer over tp GPUs of m x hidden bf16 values, and with ep two all-to-alls.

Each time is the class's fitted roofline for that shape times the table's measured ratio (the
rule in kernel_tables.py). A class with no table, or a shape whose keys no row has, is priced by
the fitted roofline alone ("roofline"), or by the profile's datasheet efficiencies when the class
has no table at all (elementwise: norms, activation, rotary; no table measures them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

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
from costmodel.experts import power_law_skew
from costmodel.gpu import GPUSpec, load_gpu
from costmodel.kernel_tables import SPECS, Curve, Hardware, KernelTable, Roofline, Surface
from costmodel.model import ModelSpec
from costmodel.profile import Profile

# decode attention in closed form (MeasuredKernels._decode_form): overhead_s, compute_s and
# memory_s per key, memory0_s, the window's cap (0: none) and the measured curve
DecodeForm = tuple[float, float, float, float, int, Curve | None]

ACT_BYTES = 2.0
DATASHEET = "datasheet roofline"


_PARSED: dict[int, tuple[dict[str, Any], dict[str, KernelTable]]] = {}


def _parsed(tables: dict[str, Any]) -> dict[str, KernelTable]:
    """Tables parsed once per profile object: a study builds a cost model per policy."""
    hit = _PARSED.get(id(tables))
    if hit is None or hit[0] is not tables:
        if len(_PARSED) >= 4:  # bounded: profiles loaded from files come and go
            del _PARSED[next(iter(_PARSED))]
        hit = _PARSED[id(tables)] = (tables, {c: KernelTable.from_json(c, raw) for c, raw in tables.items()})
    return hit[1]


MOE_ROWS_AT_TOKENS = 128  # a typical decode batch: where the skews are matched


def moe_distribution(routing_skew: float, num_experts: int, top_k: int) -> str:
    """The tables' expert-popularity rows nearest a routing skew.

    The MoE tables time each shape under `balanced` routing (no skew) and two power laws of
    expert load; each power law amounts to a log-normal sigma that depends on the token count
    (costmodel/experts.py: power_law_skew). Take the rows whose sigma at 128 tokens is nearest."""
    if not num_experts:
        return "balanced"
    sigma = {"balanced": 0.0}
    for alpha in (1.01, 1.2):
        sigma[f"power_law_{alpha}"] = power_law_skew(alpha, MOE_ROWS_AT_TOKENS, num_experts, top_k)
    return min(sigma, key=lambda d: abs(sigma[d] - routing_skew))


FP8_TENSOR_CORES = frozenset({"h100", "h200", "b200"})  # Ampere runs fp8 weights in bf16


def _dense_dtype(dtype: str, gpu: str) -> str:
    return "fp8" if dtype == "fp8" and gpu in FP8_TENSOR_CORES else "bfloat16"


def _seq_len_for_pairs(pairs: float) -> float:
    """s with s (s + 1) / 2 = pairs: a causal prompt computing that many attention pairs."""
    return (math.sqrt(8 * pairs + 1) - 1) / 2


def _memo(fn: Callable[[Any], float], most: int = 65536) -> Callable[[Any], float]:
    """`fn` remembered by argument (a dict lookup where lru_cache's wrapper costs more); the
    memory is dropped whole when it holds `most` sizes."""
    seen: dict[Any, float] = {}

    def remembered(x: Any) -> float:
        t = seen.get(x)
        if t is None:
            if len(seen) >= most:
                seen.clear()
            t = seen[x] = fn(x)
        return t
    return remembered


class MeasuredKernels:
    """Per-layer kernel times of `model` at tp x ep from measured tables (see module doc)."""

    def __init__(self, model: ModelSpec, tp: int, ep: int, profile: Profile,
                 datasheet: dict[str, Roofline], moe_distribution: str,
                 sliding_prefix: tuple[int, ...], elementwise_s: Callable[[float], float],
                 embedding_s: Callable[[float], float]) -> None:
        spec: GPUSpec = load_gpu(profile.gpu)  # calibration normalised by the datasheet peaks
        self.iteration_overhead_s = profile.iteration_overhead_s
        self.layer_overhead_s = profile.layer_overhead_s
        self._sliding_prefix = sliding_prefix
        self._embedding_s = _memo(embedding_s)  # the same few sizes recur every iteration
        tables = profile.tables
        self.hw = Hardware(spec.peak_flops, spec.hbm_bytes_per_s, spec.link_bytes_per_s)
        self.model, self.tp, self.ep = model, tp, ep
        self.tables = _parsed(tables)
        self._elementwise_s = elementwise_s  # tokens -> seconds, the datasheet roofline
        self._datasheet = datasheet  # per class: the profile's roofline, for classes without a table
        m = model
        h = m.hidden
        self.q_pg = m.q_dim // tp
        self.kv_heads_pg = max(1, m.num_kv_heads // tp)
        self.heads_pg = m.num_q_heads // tp
        wdt = _dense_dtype(m.weight_dtype, profile.gpu)
        self._expert_dtype = m.expert_dtype
        if m.expert_dtype == "fp8" and profile.gpu not in FP8_TENSOR_CORES:
            self._expert_dtype = "bfloat16"  # weight-only fp8: bf16 arithmetic
        gemms: dict[str, list[tuple[int, int, str]]] = {
            "qkv_proj": [(self.q_pg + 2 * self.kv_heads_pg * m.head_dim, h, wdt)],
            "o_proj": [(h, self.q_pg, wdt)],
        }
        if m.is_moe:
            gemms["router"] = [(m.num_experts, h, "bfloat16")]
            if m.shared_expert_intermediate:
                si = m.shared_expert_intermediate // tp
                gemms["shared_experts"] = [(2 * si, h, wdt), (h, si, wdt)]
        else:
            di = m.dense_intermediate // tp
            gemms["dense_mlp"] = [(2 * di, h, wdt), (h, di, wdt)]
        self.sources: dict[str, str] = {}
        self._x_range: dict[str, tuple[float, float]] = {}  # measured sizes, for `measured_op_sources`
        self._gemms = {name: [self._gemm(name, n, k, dt) for n, k, dt in shapes]
                       for name, shapes in gemms.items()}
        self._lm_head = _memo(self._gemm("lm_head", m.vocab // tp, h, "bfloat16"))
        self._experts = self._moe(moe_distribution) if m.is_moe else None
        self._allreduce = self._comm("allreduce", tp) if tp > 1 else None
        self._alltoall = self._comm("alltoall", ep) if ep > 1 and m.is_moe else None
        self._prefill = self._attention("prefill_attn", 0)
        self._decode = self._attention("decode_attn", 0)
        # sliding-window layers: the windowed rows when the tables measure this window
        w = m.sliding_window
        self._prefill_win = self._attention("prefill_attn", w) if w else None
        self._decode_win = self._attention("decode_attn", w) if w else None
        if self._prefill_win is not None and self._prefill_win[2] is None:
            self._prefill_win = None  # not measured: the equivalent full-attention prompt
        if self._decode_win is not None and self._decode_win[2] is None:
            self._decode_win = None
        self._last_decode: tuple[tuple[int, float, float | None], float] = ((0, 0.0, None), 0.0)
        self._decode_forms: dict[tuple[int, bool], DecodeForm] = {}
        # a chunked prompt's chunks recur at the same offsets request after request
        self._prefill_memo: dict[tuple[int, float, float | None], float] = {}
        self.layer_ops = lru_cache(maxsize=65536)(self._layer_ops)
        self.layer_time_s = lru_cache(maxsize=65536)(self._layer_time_s)

    # ---- one kernel: its shape's columns, the fitted roofline and the measured ratio ----------
    def _priced(self, op: str, cls: str, target: dict[str, Any]) -> tuple[dict[str, Any], Roofline,
                                                                              Curve | None]:
        table = self.tables.get(cls)
        if table is None:
            self.sources[op] = DATASHEET
            return target, self._datasheet[cls], None
        curve = table.curve(target, self.hw)
        self.sources[op] = curve.source if curve is not None else "fitted roofline"
        if curve is not None and op not in self._x_range:
            self._x_range[op] = curve.x_range
        return target, table.roofline, curve

    def _gemm(self, op: str, n: int, k: int, dtype: str) -> Any:
        cols, roof, curve = self._priced(op, "dense_gemm", {"dtype": dtype, "n": n, "k": k})
        work = SPECS["dense_gemm"].work
        return lambda m: self._time(work, {**cols, "m": m}, roof, curve, m)

    def _moe(self, distribution: str) -> Any:
        m = self.model
        cols, roof, curve = self._priced("experts", "expert_gemm", {
            "dtype": self._expert_dtype, "distribution": distribution, "hidden": m.hidden,
            "inter": m.expert_intermediate, "num_experts": m.num_experts, "topk": m.top_k,
            "inter_per_gpu": m.expert_intermediate / self.tp,
            "experts_per_gpu": m.num_experts / self.ep})
        work = SPECS["expert_gemm"].work
        return lambda n: self._time(work, {**cols, "num_tokens": n}, roof, curve, n)

    def _comm(self, op: str, gpus: int) -> Any:
        cols, roof, curve = self._priced(op, op, {"num_gpus": gpus})
        work = SPECS[op].work
        return lambda nbytes: self._time(work, {**cols, "message_bytes": nbytes}, roof, curve, nbytes)

    def _attention(self, cls: str, window: int) -> tuple[dict[str, Any], Roofline, Surface | None]:
        m = self.model
        target = {"kv_dtype": m.kv_cache_dtype, "window": window, "head_dim": m.head_dim,
                  "num_kv_heads": self.kv_heads_pg, "num_heads": self.heads_pg}
        table = self.tables.get(cls)
        if table is None:
            self.sources[cls] = DATASHEET
            return target, self._datasheet[cls], None
        surface = Surface(table, target, "batch", self.hw)
        if not window:
            self.sources[cls] = surface.source if surface else "fitted roofline"
            if surface:
                self._x_range[cls] = (min(c.x_range[0] for c in surface.curves),
                                      max(c.x_range[1] for c in surface.curves))
                self._x_range[cls + "_batch"] = (math.exp(surface.log_b[0]),
                                                 math.exp(surface.log_b[-1]))
        return target, table.roofline, surface if surface else None

    def _time(self, work: Any, cols: dict[str, Any], roof: Roofline, curve: Curve | None,
              x: float) -> float:
        t = float(roof.time_s(work(cols), self.hw))
        return t * curve.ratio(x) if curve is not None else t

    # ---- a layer ---------------------------------------------------------------------------
    def _layer_ops(self, tokens: int) -> dict[str, float]:
        """Seconds per kernel of one layer running `tokens` tokens (all ep groups together)."""
        if tokens <= 0:
            return {}
        m, ep = self.model, self.ep
        per_group = math.ceil(tokens / ep)  # attention and dense layers run data-parallel
        out = {name: sum(g(per_group) for g in fns) for name, fns in self._gemms.items()}
        if self._experts is not None:
            out["experts"] = self._experts(tokens)
        out["norms_elementwise"] = float(self._elementwise_s(per_group))
        if self._allreduce is not None:
            out["allreduce"] = 2 * self._allreduce(per_group * m.hidden * ACT_BYTES)
        if self._alltoall is not None:
            out["alltoall"] = 2 * self._alltoall(per_group * m.top_k * m.hidden * ACT_BYTES)
        return out

    def _layer_time_s(self, tokens: int) -> float:
        return sum(self.layer_ops(tokens).values())

    def lm_head_s(self, num_logits: int) -> float:
        return self._lm_head(math.ceil(num_logits / self.ep)) if num_logits else 0.0

    def prefill_attn_s(self, num_seqs: int, pairs: float, window_pairs: float | None = None) -> float:
        """One layer's prefill attention for `num_seqs` sequences computing `pairs` causal pairs
        in all; for a sliding-window layer also `window_pairs`, the pairs its window keeps."""
        if not num_seqs:
            return 0.0
        key = (num_seqs, pairs, window_pairs)
        t = self._prefill_memo.get(key)
        if t is None:
            if len(self._prefill_memo) >= 65536:
                self._prefill_memo.clear()
            t = self._prefill_memo[key] = self._prefill_attn_s(num_seqs, pairs, window_pairs)
        return t

    def _prefill_attn_s(self, num_seqs: int, pairs: float, window_pairs: float | None) -> float:
        b = math.ceil(num_seqs / self.ep)
        priced = self._prefill
        if window_pairs is not None:
            if self._prefill_win is not None:  # the window's own rows, at the prompts' length
                priced = self._prefill_win
            else:  # the full-attention prompt that computes as many pairs
                pairs = window_pairs
        s = _seq_len_for_pairs(pairs / num_seqs)
        return self._attn(priced, "prefill_attn", {"batch": b, "isl": s}, b, s)

    def decode_attn_s(self, num_decodes: int, kv_tokens: float, window_kv_tokens: float | None = None
                      ) -> float:
        """One layer's decode attention: `num_decodes` queries over `kv_tokens` keys in all (for a
        sliding-window layer also `window_kv_tokens`, those its window keeps)."""
        if not num_decodes:
            return 0.0
        key = (num_decodes, kv_tokens, window_kv_tokens)
        if key == self._last_decode[0]:  # the same decodes pass every segment
            return self._last_decode[1]
        overhead_s, compute_s, memory_s, memory0_s, cap, curve = self._decode_form(
            math.ceil(num_decodes / self.ep), window_kv_tokens is not None)
        if window_kv_tokens is not None and not cap:  # no windowed rows: the keys it keeps
            kv_tokens = window_kv_tokens
        ctx = kv_tokens / num_decodes  # windowed rows take the position, the kernel caps it
        c = min(ctx, cap) if cap else ctx
        t = overhead_s + max(c * compute_s, c * memory_s + memory0_s)
        if curve is not None:
            t *= curve.ratio(ctx)
        self._last_decode = (key, t)
        return t

    def decode_latencies_s(self, num_decodes: int, kv_tokens: np.ndarray,
                           window_kv_tokens: np.ndarray | None, request_overhead_s: float
                           ) -> np.ndarray:
        """`latency_s` of the whole-stack decode-only plans of `num_decodes` requests reading
        each of `kv_tokens` (and `window_kv_tokens` on sliding-window layers), as one array, plus
        the engine's time per request: the steady fast-forward's exact prices, term by term in
        latency_s's order (only decode attention changes with the KV read)."""
        n, L = num_decodes, self.model.num_layers
        lat = self.iteration_overhead_s + self.lm_head_s(n)
        lat += self._embedding_s(n / self.ep)
        lat += L * (self.layer_overhead_s + self.layer_time_s(n))
        n_slide = self._sliding_prefix[L]
        n_full = L - n_slide
        out = np.full(len(kv_tokens), lat)
        if n_full:
            out = out + n_full * self._decode_attn_many(n, kv_tokens, None)
        if n_slide:
            out = out + n_slide * self._decode_attn_many(n, kv_tokens, window_kv_tokens)
        return out + request_overhead_s * n  # type: ignore[no-any-return]

    def _decode_attn_many(self, num_decodes: int, kv_tokens: np.ndarray,
                          window_kv_tokens: np.ndarray | None) -> np.ndarray:
        """`decode_attn_s` over arrays of KV reads (one batch size)."""
        overhead_s, compute_s, memory_s, memory0_s, cap, curve = self._decode_form(
            math.ceil(num_decodes / self.ep), window_kv_tokens is not None)
        if window_kv_tokens is not None and not cap:
            kv_tokens = window_kv_tokens
        ctx = kv_tokens / num_decodes
        c = np.minimum(ctx, cap) if cap else ctx
        t = overhead_s + np.maximum(c * compute_s, c * memory_s + memory0_s)
        return t * curve.ratios(ctx) if curve is not None else t  # type: ignore[no-any-return]

    def _decode_form(self, b: int, windowed: bool) -> DecodeForm:
        """Decode attention of b queries per group, each over c keys, in closed form: its work
        is affine in c, so the roofline is overhead_s + max(c compute_s, c memory_s + memory0_s),
        times the measured ratio at c (`curve`); c is capped at `cap` where the windowed rows
        price a sliding-window layer (0: no cap). Kept per (b, windowed): every decode step
        prices one."""
        key = (b, windowed)
        form = self._decode_forms.get(key)
        if form is None:
            target, roof, surface = (self._decode_win if windowed and self._decode_win is not None
                                     else self._decode)
            work = SPECS["decode_attn"].work
            shape = {**target, "batch": b, "window": 0}  # uncapped: the cap is applied to c
            form = self._decode_forms[key] = (
                *roof.affine(work({**shape, "context": 0.0}), work({**shape, "context": 1.0}),
                             self.hw),
                int(target["window"]), surface.at(b) if surface is not None else None)
        return form

    def _attn(self, priced: tuple[dict[str, Any], Roofline, Surface | None], cls: str,
              shape: dict[str, float], b: float, x: float) -> float:
        target, roof, surface = priced
        t = float(roof.time_s(SPECS[cls].work({**target, **shape}), self.hw))
        return t * surface.ratio(b, x) if surface is not None else t

    def latency_s(self, segments: Sequence[tuple[int, int, Sequence[int]]],
                          num_logits: int, embed_tokens: int) -> float:
        """An iteration: its kernels back to back plus host overhead, from per-segment stats
        (layers l0..l1 and the folded tile sums of CostModel.price)."""
        mk, prefix = self, self._sliding_prefix
        lat = self.iteration_overhead_s + mk.lm_head_s(num_logits)
        if embed_tokens:
            lat += self._embedding_s(embed_tokens / self.ep)
        for l0, l1, s in segments:
            nl = l1 - l0
            n_slide = prefix[l1] - prefix[l0]
            n_full = nl - n_slide
            lat += nl * (self.layer_overhead_s + mk.layer_time_s(s[SUM_TOKENS]))
            if s[SUM_PF_TOKENS]:
                if n_full:
                    lat += n_full * mk.prefill_attn_s(s[SUM_PF_SEQS], s[SUM_PF_PAIRS])
                if n_slide:
                    lat += n_slide * mk.prefill_attn_s(s[SUM_PF_SEQS], s[SUM_PF_PAIRS], s[SUM_PF_PAIRS_WIN])
            if s[SUM_DEC_TOKENS]:
                if n_full:
                    lat += n_full * mk.decode_attn_s(s[SUM_DEC_TOKENS], s[SUM_DEC_KV])
                if n_slide:
                    lat += n_slide * mk.decode_attn_s(s[SUM_DEC_TOKENS], s[SUM_DEC_KV], s[SUM_DEC_KV_WIN])
        return lat
