"""Price one iteration plan: latency, energy, FLOPs and bytes, with a per-operation breakdown.

Algorithm. Tiles are folded into per-layer-range sums (tokens, causal attention pairs, KV
tokens read, each for full and sliding-window layers). The layer axis is then cut into
segments at every tile boundary; inside a segment every layer runs the same work, so each
operation is priced once per segment and multiplied by its layer count. An operation's time is
the roofline max(FLOPs / (peak * compute_eff), bytes / (bandwidth * memory_eff)) plus a fixed
launch overhead, with per-class efficiencies from the profile; the iteration's latency is the
sum over operations (kernels run back to back) plus host overhead: the profile's
iteration_overhead_s once and layer_overhead_s per layer that runs any tile (feature `nl`).
Every figure, the max rewritten (costmodel/breakdown.py), is linear in a few features of the
plan (coefficients.Features, summed over segments): one matrix-vector product prices a plan.

Parallelism: `tp` GPUs split heads, MLP and expert widths and all-reduce twice per layer.
`ep` > 1 adds ep groups of tp GPUs: attention runs data-parallel across groups (tokens split
evenly), experts are split across groups with a dispatch and a combine all-to-all, and the
busiest group's expert load sets the time (ExpertActivation.ep_imbalance, experts placed without
regard to popularity as vLLM does without EPLB; a measured MoE row is already the busiest
rank's, so table pricing does not inflate it again). A replica has
tp * ep GPUs. Figures in `ops` are per GPU on the critical path; totals are for the replica.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from costmodel.breakdown import _LINEAR, linear_forms, op_table
from costmodel.coefficients import (
    _HBM,
    _LINK_OPS,
    _OP_INDEX,
    _QUANTITIES,
    FEATURES,
    LAYER_SUMS,
    OPS,
    SUM_DEC_KV,
    SUM_DEC_KV_WIN,
    SUM_DEC_TOKENS,
    SUM_PF_KV,
    SUM_PF_KV_WIN,
    SUM_PF_PAIRS,
    SUM_PF_PAIRS_WIN,
    SUM_PF_SEQS,
    SUM_PF_TOKENS,
    SUM_TOKENS,
    Features,
    coefficients,
)
from costmodel.cost import HbmBytes, IterationCost, OpCost, Parallelism
from costmodel.experts import ExpertActivation
from costmodel.fit import check_memory, check_parallelism, kv_bytes_per_token_per_gpu, weight_bytes_per_gpu
from costmodel.gpu import GPUSpec, load_gpu
from costmodel.kernel_tables import Roofline
from costmodel.measured import MeasuredKernels, moe_distribution
from costmodel.model import ModelSpec
from costmodel.plan import Tile
from costmodel.profile import Profile, default_profile
from costmodel.run_price import DecodeRunForm, StretchPrices, decode_run_totals, price_stretch

# Where each Features field sits in the list CostModel._price_segments sums the features in.
_X_TM, _X_NL, _X_EXPERT_UNITS = (FEATURES.index(f) for f in ("tm", "nl", "expert_units"))
_X_PF_PAIRS, _X_PF_KV, _X_PF_Q = (FEATURES.index(f) for f in ("pf_pairs", "pf_kv", "pf_q"))
_X_DEC_KV, _X_DEC_Q = (FEATURES.index(f) for f in ("dec_kv", "dec_q"))
_X_NL_PF, _X_NL_DEC = (FEATURES.index(f) for f in ("nl_pf", "nl_dec"))
_X_LOGITS, _X_HAS_LOGITS = (FEATURES.index(f) for f in ("logits", "has_logits"))
_X_EMBED, _X_HAS_EMBED = (FEATURES.index(f) for f in ("embed", "has_embed"))
# token work that the ep attention groups split between them
_X_PER_GROUP = (_X_TM, _X_PF_PAIRS, _X_PF_KV, _X_PF_Q, _X_DEC_KV, _X_DEC_Q)

# Rows of CostModel._forms (breakdown._LINEAR) that _price_segments reads.
_L_SECONDS, _L_FLOPS, _L_WBYTES = (_LINEAR.index(f) for f in ("seconds", "flops", "wbytes"))
_L_KVR, _L_KVW, _L_ACT, _L_LINK = (_LINEAR.index(f) for f in ("kvr", "kvw", "act", "link"))


def _window_pairs(c: int, n: int, w: int) -> int:
    """sum over query positions p in [c, c+n) of min(p + 1, w): keys seen through a window."""
    lo, hi = c + 1, c + n  # key counts without a window run lo..hi
    if hi <= w:
        return (lo + hi) * n // 2
    if lo > w:
        return w * n
    return (lo + w) * (w - lo + 1) // 2 + w * (hi - w)


def _rebuilt(cls: type[CostModel], built_from: tuple[Any, ...], own: dict[str, Any]) -> CostModel:
    """A pickled subclass of CostModel: the base built as it was, then the subclass's own
    attributes (its __init__ is not called again: its arguments are not known)."""
    obj = cls.__new__(cls)
    CostModel.__init__(obj, *built_from)
    obj.__dict__.update(own)
    return obj


class CostModel:
    """Prices plans for one model on one replica of `parallel.num_gpus` GPUs."""

    def __init__(self, model: ModelSpec, gpu: str | GPUSpec = "h100",
                 profile: Profile | None = None, parallel: Parallelism | None = None) -> None:
        self._built_from = (model, gpu, profile, parallel)  # what pickling rebuilds it from
        hw = load_gpu(gpu) if isinstance(gpu, str) else gpu
        self.profile = profile if profile is not None else default_profile(hw)
        self.hw = self.profile.hardware() if profile is not None else hw
        self.model = model
        self.parallel = parallel or Parallelism()
        check_parallelism(model, self.parallel)
        self.activation = ExpertActivation(model.num_experts, model.top_k, model.routing_skew)
        self.ep_imbalance = self.activation.ep_imbalance(self.parallel.ep, placement="random")
        check_memory(model, self.parallel, self.hw)
        self._K = coefficients(self.model, self.parallel.tp, self.parallel.ep, self.ep_imbalance)
        params = [self.profile.ops[c] for _, c in OPS]
        is_link = np.array([c in _LINK_OPS for _, c in OPS])
        link_bw = self.hw.link_bytes_per_s / 2  # one direction
        self._inv_compute = np.array([1 / (self.hw.peak_flops * p.compute_eff) for p in params])
        self._inv_memory = np.where(is_link, 0.0, [1 / (self.hw.hbm_bytes_per_s * p.memory_eff)
                                                   for p in params])
        self._inv_link = np.where(is_link, [1 / (link_bw * p.memory_eff) for p in params], 0.0)
        self._overhead = np.array([p.overhead_s for p in params])
        self._forms = linear_forms(self, is_link)
        self._linear = self._forms[:len(_LINEAR)]  # all that plans priced by tables need
        self._is_moe = model.is_moe
        self._experts_per_group = model.num_experts / self.parallel.ep
        self._bytes_per_expert = model.expert_params * model.expert_weight_bytes
        e = self.profile.energy
        busy_w = e.busy_w if e.busy_w is not None else e.idle_w
        self._energy = (busy_w * self.parallel.num_gpus, e.j_per_flop, e.j_per_hbm_byte,
                        e.j_per_link_byte)
        self._sliding_prefix = [0]
        for s in model.sliding_layers:
            self._sliding_prefix.append(self._sliding_prefix[-1] + int(s))
        self._datasheet_terms: dict[tuple[str, str], tuple[float, ...]] = {}
        self._decode_run_forms: dict[int, DecodeRunForm] = {}  # per batch size (run_price.py)
        self.measured = self._measured_kernels() if self.profile.tables else None
        self._base_keys = frozenset(self.__dict__) | {"_base_keys"}

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as the arguments it was built from (its caches hold closures), so that a copy
        prices alike: a shard of a simulation may run in another process or on another machine
        (sim/cluster.py). A subclass keeps its class and the attributes it added."""
        if type(self) is CostModel:
            return CostModel, self._built_from
        own = {k: v for k, v in self.__dict__.items() if k not in self._base_keys}
        return _rebuilt, (type(self), self._built_from, own)

    def _measured_kernels(self) -> MeasuredKernels:
        ops = self.profile.ops
        datasheet = {c: Roofline(p.compute_eff, p.memory_eff, p.overhead_s) for c, p in ops.items()}
        return MeasuredKernels(
            self.model, self.parallel.tp, self.parallel.ep, self.profile, datasheet,
            moe_distribution(self.model.routing_skew, self.model.num_experts, self.model.top_k),
            tuple(self._sliding_prefix),
            elementwise_s=lambda tokens: self._datasheet_op("norms_elementwise", tokens),
            embedding_s=lambda tokens: self._datasheet_op("embedding", tokens, "embed"))

    def _datasheet_op(self, op: str, tokens: float, feature: str = "tm") -> float:
        """One launch of a token-proportional op by the profile's roofline (no table has it)."""
        key = (op, feature)
        terms = self._datasheet_terms.get(key)
        if terms is None:  # the op's constants, as Python floats: the same IEEE products
            i, f = _OP_INDEX[op], FEATURES.index(feature)
            terms = self._datasheet_terms[key] = (
                float(self._K[_QUANTITIES.index("flops"), i, f]),
                float(sum(self._K[_QUANTITIES.index(q), i, f] for q in _HBM)),
                float(self._inv_compute[i]), float(self._inv_memory[i]), float(self._overhead[i]))
        k_flops, k_hbm, inv_compute, inv_memory, overhead = terms
        t_c, t_m = k_flops * tokens * inv_compute, k_hbm * tokens * inv_memory
        return overhead + max(t_c, t_m)

    # ---- validation and memory (costmodel/fit.py) -------------------------------------------
    @property
    def weight_bytes_per_gpu(self) -> float:
        return weight_bytes_per_gpu(self.model, self.parallel)

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        return kv_bytes_per_token_per_gpu(self.model, self.parallel)

    # ---- pricing ----------------------------------------------------------------------------
    def price(self, plan: tuple[Tile, ...] | list[Tile]) -> IterationCost:
        m = self.model
        w = m.sliding_window
        # Fold tiles per layer range into lists of LAYER_SUMS (at SUM_TOKENS, ...).
        L = m.num_layers
        agg: dict[tuple[int, int], list[int]] = {}
        num_logits = embed_tokens = 0
        # Fast path for whole-stack decodes, the bulk of every plan: plain local sums.
        others = dkv = dkv_win = prefill = prefill_layer_tokens = 0
        for _rid, t0, t1, l0, l1, c, logits in plan:
            if t1 - t0 == 1 and l1 == L and logits and not l0:  # this test order runs fastest
                dkv += c
                if w:
                    dkv_win += c + 1 if c < w else w
                continue
            others += 1
            n = t1 - t0
            prefill += n
            prefill_layer_tokens += n * (l1 - l0)
            self._fold(agg, n, l0, l1, c)
            if logits:
                num_logits += 1
            if l0 == 0:
                embed_tokens += n
        dn = len(plan) - others
        if dn:
            self._add_decodes(agg, dn, dkv + dn, dkv_win)
        return self._price_segments(agg, num_logits + dn, embed_tokens + dn, dn, prefill,
                                    prefill_layer_tokens, len(plan))

    def _fold(self, agg: dict[tuple[int, int], list[int]], n: int, l0: int, l1: int,
              c: int) -> None:
        """Add one tile of `n` tokens after `c` of context through layers [l0, l1) to `agg`."""
        w = self.model.sliding_window
        a = agg.get((l0, l1))
        if a is None:
            a = agg[(l0, l1)] = [0] * len(LAYER_SUMS)
        a[SUM_TOKENS] += n
        if n == 1:
            a[SUM_DEC_TOKENS] += 1
            a[SUM_DEC_KV] += c + 1
            a[SUM_DEC_KV_WIN] += (c + 1 if c < w else w) if w else c + 1
        else:
            a[SUM_PF_TOKENS] += n
            a[SUM_PF_SEQS] += 1
            a[SUM_PF_PAIRS] += (2 * c + n + 1) * n // 2
            a[SUM_PF_KV] += c + n
            if w:
                a[SUM_PF_PAIRS_WIN] += _window_pairs(c, n, w)
                a[SUM_PF_KV_WIN] += c + n - max(0, c - w + 1)

    def price_with_decodes(self, num_decodes: int, kv_tokens: int, kv_tokens_window: int,
                           tiles: Sequence[Tile]) -> IterationCost:
        """`price` of a plan of `num_decodes` whole-stack decodes (kv_tokens, kv_tokens_window as
        in price_decodes) and the prompt `tiles`, from the decodes' totals alone: the prefill
        fast-forward's path, the same sums as `price` (integers: their order does not matter).
        A prompt's last token alone with logits is priced as a decode, as `price` does, but
        counted here with the prompt tiles (decode_tokens is `num_decodes`)."""
        agg: dict[tuple[int, int], list[int]] = {}
        embed, prefill, prefill_layer_tokens, num_logits = self._fold_tiles(agg, tiles)
        if num_decodes:
            self._add_decodes(agg, num_decodes, kv_tokens, kv_tokens_window)
        return self._price_segments(agg, num_decodes + num_logits, embed + num_decodes,
                                    num_decodes, prefill, prefill_layer_tokens,
                                    num_decodes + len(tiles))

    def _fold_tiles(self, agg: dict[tuple[int, int], list[int]], tiles: Sequence[Tile]
                    ) -> tuple[int, int, int, int]:
        """Fold prompt tiles into `agg`; (tokens embedded, tokens, tokens x layers, logits)."""
        embed = prefill = prefill_layer_tokens = num_logits = 0
        for _rid, t0, t1, l0, l1, c, logits in tiles:
            n = t1 - t0
            self._fold(agg, n, l0, l1, c)
            prefill += n
            prefill_layer_tokens += n * (l1 - l0)
            if l0 == 0:
                embed += n
            if logits:
                num_logits += 1
        return embed, prefill, prefill_layer_tokens, num_logits

    def price_stretch(self, num_decodes: int, kv_tokens: int, kv_tokens_window: Sequence[int],
                      steps: Sequence[Sequence[Tile]]) -> StretchPrices:
        """Each of `steps` (prompt tiles) beside `num_decodes` whole-stack decodes whose KV read
        starts at `kv_tokens` and grows by num_decodes a step (`kv_tokens_window`: each step's
        windowed read, empty for a model without a window): costmodel/run_price.py."""
        return price_stretch(self, num_decodes, kv_tokens, kv_tokens_window, steps)

    def _add_decodes(self, agg: dict[tuple[int, int], list[int]], num: int, kv_tokens: int,
                     kv_tokens_window: int) -> None:
        key = (0, self.model.num_layers)
        a = agg.get(key)
        if a is None:
            a = agg[key] = [0] * len(LAYER_SUMS)
        a[SUM_TOKENS] += num
        a[SUM_DEC_TOKENS] += num
        a[SUM_DEC_KV] += kv_tokens
        a[SUM_DEC_KV_WIN] += kv_tokens_window if self.model.sliding_window else kv_tokens

    def price_decodes(self, num: int, kv_tokens: int, kv_tokens_window: int = 0,
                      latency_s: float | None = None) -> IterationCost:
        """A plan of `num` whole-stack decodes, from its totals alone: the fast-forward's path.

        kv_tokens is the sum over requests of (context + 1); kv_tokens_window the same with each
        term capped at the sliding window (ignored for models without one). `latency_s`: its
        latency, already priced by decode_latencies_s (measured tables), not priced again."""
        agg: dict[tuple[int, int], list[int]] = {}
        self._add_decodes(agg, num, kv_tokens, kv_tokens_window)
        return self._price_segments(agg, num, num, num, 0, 0, num, latency_s)

    def decode_run_totals(self, num: int, kv_tokens: int, kv_tokens_window: int,
                          window_growth: int, steps: int, latency_s: float) -> dict[str, Any]:
        """The record's figures summed over a steady run of `steps` decode iterations
        (costmodel/run_price.py)."""
        return decode_run_totals(self, num, kv_tokens, kv_tokens_window, window_growth, steps,
                                 latency_s)

    def decode_latencies_s(self, num: int, kv_tokens: np.ndarray, kv_tokens_window: np.ndarray
                           ) -> np.ndarray | None:
        """`price_decodes(num, kv, kv_window).latency_s` for each pair of the arrays, or None
        where that is affine in the KV read and two prices give the rest (the datasheet
        roofline): with measured tables decode attention's time is interpolated between
        measured contexts in log space, so every step is priced."""
        if self.measured is None:
            return None
        window = kv_tokens_window if self.model.sliding_window else None
        return self.measured.decode_latencies_s(num, kv_tokens, window,
                                                self.profile.request_overhead_s)

    @property
    def busy_power_w(self) -> float:
        """The replica's static power while it computes (energy = this x latency + the rest)."""
        return float(self._energy[0])

    @staticmethod
    def _segments(agg: dict[tuple[int, int], list[int]]) -> list[tuple[int, int, list[int]]]:
        """Cut the layer axis at every tile boundary; sum the stats of the ranges covering each cut."""
        if len(agg) == 1:
            ((l0, l1), a), = agg.items()
            return [(l0, l1, a)]
        cuts = sorted({x for key in agg for x in key})
        items = list(agg.items())
        out = []
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            s: list[int] | None = None
            for (l0, l1), v in items:
                if l0 <= lo and l1 >= hi:
                    s = list(v) if s is None else [p + q for p, q in zip(s, v, strict=True)]
            if s is not None:
                out.append((lo, hi, s))
        return out

    def _features(self, agg: dict[tuple[int, int], list[int]], num_logits: int,
                  embed_tokens: int) -> tuple[list[float], list[tuple[int, int, list[int]]],
                                              list[tuple[int, int, float]], float]:
        """The plan's feature vector (coefficients.FEATURES, as a list), its layer segments,
        the expected distinct experts per segment and their sum over layers."""
        ep, imb, is_moe = self.parallel.ep, self.ep_imbalance, self._is_moe
        prefix = self._sliding_prefix
        x = [0.0] * len(FEATURES)
        expert_segments = []
        distinct_layers = 0.0
        segments = self._segments(agg)
        for l0, l1, s in segments:
            layers = l1 - l0
            n_slide = prefix[l1] - prefix[l0]
            n_full = layers - n_slide
            x[_X_TM] += s[SUM_TOKENS] * layers
            x[_X_NL] += layers
            if s[SUM_PF_TOKENS]:
                x[_X_PF_PAIRS] += n_full * s[SUM_PF_PAIRS] + n_slide * s[SUM_PF_PAIRS_WIN]
                x[_X_PF_KV] += n_full * s[SUM_PF_KV] + n_slide * s[SUM_PF_KV_WIN]
                x[_X_PF_Q] += s[SUM_PF_TOKENS] * layers
                x[_X_NL_PF] += layers
            if s[SUM_DEC_TOKENS]:
                x[_X_DEC_KV] += n_full * s[SUM_DEC_KV] + n_slide * s[SUM_DEC_KV_WIN]
                x[_X_DEC_Q] += s[SUM_DEC_TOKENS] * layers
                x[_X_NL_DEC] += layers
            if is_moe:
                distinct = self.activation.distinct(s[SUM_TOKENS])
                expert_segments.append((l0, l1, distinct))
                distinct_layers += distinct * layers
                x[_X_EXPERT_UNITS] += layers * min(self._experts_per_group, distinct / ep * imb)
        if ep > 1:
            for i in _X_PER_GROUP:
                x[i] /= ep
        x[_X_LOGITS] = num_logits / ep
        x[_X_HAS_LOGITS] = 1.0 if num_logits else 0.0
        x[_X_EMBED] = embed_tokens / ep
        x[_X_HAS_EMBED] = 1.0 if embed_tokens else 0.0
        return x, segments, expert_segments, distinct_layers

    def _figures(self, r: list[float], latency_s: float, distinct_layers: float
                 ) -> tuple[float, float, HbmBytes, float]:
        """(energy_j, flops, hbm_bytes, link_bytes) of the replica from the linear forms' values
        `r` (per GPU), the latency and the distinct experts summed over layers."""
        gpus = self.parallel.num_gpus
        dense_w, expert_w = r[_L_WBYTES] * gpus, distinct_layers * self._bytes_per_expert
        kv_read, kv_write, act = r[_L_KVR] * gpus, r[_L_KVW] * gpus, r[_L_ACT] * gpus
        flops, link = r[_L_FLOPS] * gpus, r[_L_LINK] * gpus
        e_idle, e_flop, e_byte, e_link = self._energy
        energy = (e_idle * latency_s + e_flop * flops
                  + e_byte * (dense_w + expert_w + kv_read + kv_write + act) + e_link * link)
        return energy, flops, HbmBytes(dense_w, expert_w, kv_read, kv_write, act), link

    def _price_segments(self, agg: dict[tuple[int, int], list[int]], num_logits: int,
                        embed_tokens: int, decode_tokens: int, prefill_tokens: int,
                        prefill_layer_tokens: int, num_tiles: int,
                        latency_s: float | None = None) -> IterationCost:
        x, segments, expert_segments, distinct_layers = self._features(agg, num_logits,
                                                                       embed_tokens)
        measured = None
        if self.measured is not None:
            r = self._linear.dot(x).tolist()
            measured = (segments, num_logits, embed_tokens)  # kept for the breakdown, not copied
            if latency_s is None:
                latency_s = (self.measured.latency_s(*measured)
                             + self.profile.request_overhead_s * num_tiles)
        else:
            r = self._forms.dot(x).tolist()
            if latency_s is None:
                latency_s = (self.profile.iteration_overhead_s + r[_L_SECONDS]
                             + sum(map(abs, r[len(_LINEAR):]))  # see breakdown.linear_forms
                             + self.profile.request_overhead_s * num_tiles)
        energy, flops, hbm, link = self._figures(r, latency_s, distinct_layers)
        return IterationCost(latency_s, energy, flops, hbm, link, self.parallel.num_gpus,
                             decode_tokens, prefill_tokens, prefill_layer_tokens,
                             (self, Features._make(x), tuple(expert_segments), self.model.num_layers,
                              measured))

    def op_table(self, x: tuple[float, ...], measured: Any = None) -> tuple[OpCost, ...]:
        """The per-operation breakdown for a feature vector (breakdown.op_table)."""
        return op_table(self, x, measured)

    def idle_power_w(self) -> float:
        """Power the replica draws with nothing to run."""
        return self.profile.energy.idle_w * self.parallel.num_gpus
