"""Price one iteration plan: latency, energy, FLOPs and bytes, with a per-operation breakdown.

Algorithm. Tiles are folded into per-layer-range sums (tokens, causal attention pairs, KV
tokens read, each for full and sliding-window layers). The layer axis is then cut into
segments at every tile boundary; inside a segment every layer runs the same work, so each
operation is priced once per segment and multiplied by its layer count. An operation's time is
the roofline max(FLOPs / (peak * compute_eff), bytes / (bandwidth * memory_eff)) plus a fixed
launch overhead, with per-class efficiencies from the profile; the iteration's latency is the
sum over operations (kernels run back to back) plus host overhead: the profile's
iteration_overhead_s once and layer_overhead_s per layer that runs any tile (feature `nl`),
shown in `ops` as a `host_overhead` row (class "host") when non-zero.

Parallelism: `tp` GPUs split heads, MLP and expert widths and all-reduce twice per layer.
`ep` > 1 adds ep groups of tp GPUs: attention runs data-parallel across groups (tokens split
evenly), experts are split across groups with a dispatch and a combine all-to-all, and the
busiest group's expert load sets the time (ExpertActivation.ep_imbalance, experts placed without
regard to popularity as vLLM does without EPLB; a measured MoE row is already the busiest
rank's, so table pricing does not inflate it again). A replica has
tp * ep GPUs. Figures in `ops` are per GPU on the critical path; totals are for the replica.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from costmodel.coefficients import (
    _EXPERTS,
    _LINK_OPS,
    _OP_INDEX,
    _QUANTITIES,
    FEATURES,
    OPS,
    _kept_bytes,
    coefficients,
)
from costmodel.cost import HbmBytes, IterationCost, OpCost, Parallelism
from costmodel.errors import ConfigError
from costmodel.experts import ExpertActivation
from costmodel.gpu import GPUSpec, load_gpu
from costmodel.kernel_tables import Roofline
from costmodel.measured import MeasuredKernels, moe_distribution
from costmodel.model import ModelSpec
from costmodel.plan import Tile
from costmodel.profile import Profile, default_profile

WEIGHT_HEADROOM = 0.95  # weights must fit in this share of HBM


_PER_GROUP = (0, 2, 3, 4, 5, 6)  # token work that ep attention groups split between them


def _window_pairs(c: int, n: int, w: int) -> int:
    """sum over query positions p in [c, c+n) of min(p + 1, w): keys seen through a window."""
    lo, hi = c + 1, c + n  # key counts without a window run lo..hi
    if hi <= w:
        return (lo + hi) * n // 2
    if lo > w:
        return w * n
    return (lo + w) * (w - lo + 1) // 2 + w * (hi - w)


class CostModel:
    """Prices plans for one model on one replica of `parallel.num_gpus` GPUs."""

    def __init__(self, model: ModelSpec, gpu: str | GPUSpec = "h100",
                 profile: Profile | None = None, parallel: Parallelism | None = None) -> None:
        hw = load_gpu(gpu) if isinstance(gpu, str) else gpu
        self.profile = profile if profile is not None else default_profile(hw)
        self.hw = self.profile.hardware() if profile is not None else hw
        self.model = model
        self.parallel = parallel or Parallelism()
        self._check_parallelism()
        self.activation = ExpertActivation(model.num_experts, model.top_k, model.routing_skew)
        self.ep_imbalance = self.activation.ep_imbalance(self.parallel.ep, placement="random")
        self._check_memory()
        self._K = coefficients(self.model, self.parallel.tp, self.parallel.ep, self.ep_imbalance)
        params = [self.profile.ops[c] for _, c in OPS]
        is_link = np.array([c in _LINK_OPS for _, c in OPS])
        link_bw = self.hw.link_bytes_per_s / 2  # one direction
        self._inv_compute = np.array([1 / (self.hw.peak_flops * p.compute_eff) for p in params])
        self._inv_memory = np.where(is_link, 0.0, [1 / (self.hw.hbm_bytes_per_s * p.memory_eff)
                                                   for p in params])
        self._inv_link = np.where(is_link, [1 / (link_bw * p.memory_eff) for p in params], 0.0)
        self._overhead = np.array([p.overhead_s for p in params])
        self._kernel = self._compile(is_link)
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
        self.measured = self._measured_kernels() if self.profile.tables else None

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
        i, f = _OP_INDEX[op], FEATURES.index(feature)
        flops = self._K[_QUANTITIES.index("flops"), i, f] * tokens
        hbm = sum(self._K[_QUANTITIES.index(q), i, f] for q in ("wbytes", "xbytes", "kvr", "kvw", "act"))
        t_c, t_m = flops * self._inv_compute[i], hbm * tokens * self._inv_memory[i]
        return float(self._overhead[i] + max(t_c, t_m))

    # ---- validation -------------------------------------------------------------------------
    def _check_parallelism(self) -> None:
        m, tp, ep = self.model, self.parallel.tp, self.parallel.ep
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

    @property
    def weight_bytes_per_gpu(self) -> float:
        m, tp, ep = self.model, self.parallel.tp, self.parallel.ep
        kv_dim_pg = max(1, m.num_kv_heads // tp) * m.head_dim
        attn = m.hidden * (2 * m.q_dim // tp + 2 * kv_dim_pg)
        dense = m.num_layers * (attn + m.dense_mlp_params_per_layer // tp)
        experts = m.num_layers * (m.num_experts // ep) * m.expert_params // tp
        return (dense * m.weight_bytes + experts * m.expert_weight_bytes
                + m.embedding_params // tp * _kept_bytes(m.weight_bytes))

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        m = self.model
        return 2.0 * max(1, m.num_kv_heads // self.parallel.tp) * m.head_dim * m.kv_bytes * m.num_layers

    def _check_memory(self) -> None:
        need = self.weight_bytes_per_gpu
        have = self.hw.hbm_bytes * WEIGHT_HEADROOM
        if need > have:
            raise ConfigError(
                f"{self.model.name} does not fit: {need / 1e9:.1f} GB of weights per GPU with "
                f"tp={self.parallel.tp} ep={self.parallel.ep}, {self.hw.name} has "
                f"{self.hw.hbm_bytes / 1e9:.0f} GB; raise --tp or --ep"
            )

    # ---- pricing ----------------------------------------------------------------------------
    def price(self, plan: tuple[Tile, ...] | list[Tile]) -> IterationCost:
        m = self.model
        w = m.sliding_window
        # Fold tiles per layer range: [tokens, pf_tokens, pf_pairs, pf_pairs_win, pf_kv,
        # pf_kv_win, dec_tokens, dec_kv, dec_kv_win, pf_sequences].
        L = m.num_layers
        agg: dict[tuple[int, int], list[int]] = {}
        num_logits = embed_tokens = 0
        # Fast path for whole-stack decodes, the bulk of every plan: plain local sums.
        dn = dkv = dkv_win = prefill = prefill_layer_tokens = 0
        for _rid, t0, t1, l0, l1, c, logits in plan:
            n = t1 - t0
            if n == 1 and logits and l0 == 0 and l1 == L:
                dn += 1
                dkv += c
                if w:
                    dkv_win += c + 1 if c < w else w
                continue
            prefill += n
            prefill_layer_tokens += n * (l1 - l0)
            a = agg.get((l0, l1))
            if a is None:
                a = agg[(l0, l1)] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
            a[0] += n
            if n == 1:
                a[6] += 1
                a[7] += c + 1
                a[8] += (c + 1 if c < w else w) if w else c + 1
            else:
                a[1] += n
                a[9] += 1
                a[2] += (2 * c + n + 1) * n // 2
                a[4] += c + n
                if w:
                    a[3] += _window_pairs(c, n, w)
                    a[5] += c + n - max(0, c - w + 1)
            if logits:
                num_logits += 1
            if l0 == 0:
                embed_tokens += n
        if dn:
            self._add_decodes(agg, dn, dkv + dn, dkv_win)
        return self._price_segments(agg, num_logits + dn, embed_tokens + dn, dn, prefill,
                                    prefill_layer_tokens, len(plan))

    def _add_decodes(self, agg: dict[tuple[int, int], list[int]], num: int, kv_tokens: int,
                     kv_tokens_window: int) -> None:
        key = (0, self.model.num_layers)
        a = agg.get(key)
        if a is None:
            a = agg[key] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        a[0] += num
        a[6] += num
        a[7] += kv_tokens
        a[8] += kv_tokens_window if self.model.sliding_window else kv_tokens

    def price_decodes(self, num: int, kv_tokens: int, kv_tokens_window: int = 0) -> IterationCost:
        """A plan of `num` whole-stack decodes, from its totals alone: the fast-forward's path.

        kv_tokens is the sum over requests of (context + 1); kv_tokens_window the same with each
        term capped at the sliding window (ignored for models without one)."""
        agg: dict[tuple[int, int], list[int]] = {}
        self._add_decodes(agg, num, kv_tokens, kv_tokens_window)
        return self._price_segments(agg, num, num, num, 0, 0, num)

    def _compile(self, is_link: np.ndarray) -> Callable[..., tuple[float, ...]]:
        """Turn the coefficient tensor into one straight-line function of the features.

        The simulator prices millions of plans; with the constants inlined, an iteration's
        latency and totals cost a few dozen float operations instead of loops over sparse
        terms. Returns (latency, then the replica-total quantities per GPU)."""
        K = self._K
        q = {name: i for i, name in enumerate(_QUANTITIES)}
        args = ", ".join(f"x{j}" for j in range(len(FEATURES)))

        def dot(row: np.ndarray) -> str:
            terms = [f"{float(c)!r} * x{j}" for j, c in enumerate(row) if c]
            return " + ".join(terms) if terms else "0.0"

        lines = [f"def kernel({args}):", f"    lat = {self.profile.iteration_overhead_s!r}"]
        if self.profile.layer_overhead_s:  # host time per layer with work: x1 is `nl`
            lines.append(f"    lat += {self.profile.layer_overhead_s!r} * x{FEATURES.index('nl')}")
        for i in range(len(OPS)):
            launches = dot(K[q["launches"], i])
            if launches == "0.0":
                continue
            hbm = sum(K[q[k], i] for k in ("wbytes", "xbytes", "kvr", "kvw", "act"))
            traffic = dot(K[q["link"], i] if is_link[i] else hbm)
            inv_m = float(self._inv_link[i] if is_link[i] else self._inv_memory[i])
            lines += [f"    c = ({dot(K[q['flops'], i])}) * {float(self._inv_compute[i])!r}",
                      f"    m = ({traffic}) * {inv_m!r}",
                      f"    lat += (c if c > m else m) + ({launches}) * {float(self._overhead[i])!r}"]
        # Replica totals: expert FLOPs and activations without the busiest-group inflation.
        balanced = K.copy()
        balanced[:, _EXPERTS, :] /= self.ep_imbalance
        totals = [dot(balanced[k].sum(axis=0)) for k in range(len(_QUANTITIES) - 1)]
        lines.append(f"    return (lat, {', '.join(totals)})")
        namespace: dict[str, Any] = {}
        exec(compile("\n".join(lines), f"<costmodel kernel {self.model.name}>", "exec"), namespace)
        return namespace["kernel"]  # type: ignore[no-any-return]

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

    def _price_segments(self, agg: dict[tuple[int, int], list[int]], num_logits: int,
                        embed_tokens: int, decode_tokens: int, prefill_tokens: int,
                        prefill_layer_tokens: int, num_tiles: int) -> IterationCost:
        ep, imb, is_moe = self.parallel.ep, self.ep_imbalance, self._is_moe
        prefix = self._sliding_prefix
        x = [0.0] * len(FEATURES)
        expert_segments = []
        distinct_layers = 0.0
        segments = self._segments(agg)
        for l0, l1, s in segments:
            nl = l1 - l0
            n_slide = prefix[l1] - prefix[l0]
            n_full = nl - n_slide
            x[0] += s[0] * nl
            x[1] += nl
            if s[1]:
                x[2] += n_full * s[2] + n_slide * s[3]
                x[3] += n_full * s[4] + n_slide * s[5]
                x[4] += s[1] * nl
                x[8] += nl
            if s[6]:
                x[5] += n_full * s[7] + n_slide * s[8]
                x[6] += s[6] * nl
                x[9] += nl
            if is_moe:
                distinct = self.activation.distinct(s[0])
                expert_segments.append((l0, l1, distinct))
                distinct_layers += distinct * nl
                x[7] += nl * min(self._experts_per_group, distinct / ep * imb)
        if ep > 1:
            for i in _PER_GROUP:
                x[i] /= ep
        x[10] = num_logits / ep
        x[11] = 1.0 if num_logits else 0.0
        x[12] = embed_tokens / ep
        x[13] = 1.0 if embed_tokens else 0.0
        latency, flops, wbytes, _, kvr, kvw, act, link = self._kernel(*x)
        measured = None
        if self.measured is not None:
            measured = (segments, num_logits, embed_tokens)  # kept for the breakdown, not copied
            latency = self.measured.latency_s(*measured)
        latency += self.profile.request_overhead_s * num_tiles  # engine time per running request
        gpus = self.parallel.num_gpus
        hbm = HbmBytes(wbytes * gpus, distinct_layers * self._bytes_per_expert, kvr * gpus,
                       kvw * gpus, act * gpus)
        flops *= gpus
        link *= gpus
        e_idle, e_flop, e_byte, e_link = self._energy
        energy = (e_idle * latency + e_flop * flops + e_byte * (hbm[0] + hbm[1] + hbm[2] + hbm[3] + hbm[4])
                  + e_link * link)
        return IterationCost(latency, energy, flops, hbm, link, gpus, decode_tokens, prefill_tokens,
                             prefill_layer_tokens,
                             (self, tuple(x), tuple(expert_segments), self.model.num_layers, measured))

    def op_table(self, x: tuple[float, ...], measured: Any = None) -> tuple[OpCost, ...]:
        """The per-operation breakdown for a feature vector (see IterationCost.ops).

        With measured tables, `time_s` is the tables' and `bound` says what priced the op."""
        flops, wbytes, xbytes, kvr, kvw, act, link, launches = (self._K @ np.array(x)).tolist()
        inv_compute, inv_memory = self._inv_compute.tolist(), self._inv_memory.tolist()
        inv_link, overhead = self._inv_link.tolist(), self._overhead.tolist()
        times = self.measured.op_times_s(*measured) if self.measured and measured is not None else {}
        out = []
        for i, (name, cls) in enumerate(OPS):
            if not launches[i]:
                continue
            hbm = wbytes[i] + xbytes[i] + kvr[i] + kvw[i] + act[i]
            if self.measured is not None and measured is not None:
                sources = self.measured.op_sources(measured[0], measured[1])
                source = sources.get(name, sources.get(cls, "datasheet roofline"))
                out.append(OpCost(name, cls, flops[i], hbm, link[i], times.get(name, 0.0), source))
                continue
            t_c = flops[i] * inv_compute[i]
            t_m = hbm * inv_memory[i] + link[i] * inv_link[i]
            t_o = launches[i] * overhead[i]
            roof = max(t_c, t_m)
            mem_kind = "link" if cls in _LINK_OPS else "memory"
            bound = "overhead" if t_o > roof else ("compute" if t_c >= t_m else mem_kind)
            out.append(OpCost(name, cls, flops[i], hbm, link[i], roof + t_o, bound))
        host = self.profile.layer_overhead_s * x[FEATURES.index("nl")]
        if host:
            out.append(OpCost("host_overhead", "host", 0.0, 0.0, 0.0, host, "overhead"))
        return tuple(out)

    def idle_power_w(self) -> float:
        """Power the replica draws with nothing to run."""
        return self.profile.energy.idle_w * self.parallel.num_gpus
