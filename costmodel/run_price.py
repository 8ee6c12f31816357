"""Price fast-forwarded runs (sim/fast_forward.py): prefill stretches and steady decoding.

A prefill stretch (core/stretch.py) is iterations of the same decodes beside known prompt
tiles, each latency exactly as `CostModel.price_with_decodes` gives it.

The simulator needs every iteration's latency (when each ends) but only the sums of the other
figures over the iterations that ran (one record row). With measured kernel tables a latency
comes from the plan's layer segments, not from the linear forms, so each iteration is folded,
its features kept and its latency priced by the same calls as `price_with_decodes`; the
figures come at the end from the features summed over the iterations that ran, in one
matrix-vector product (the forms are linear: the same figures as summing each iteration's,
up to rounding). Other cost models (the datasheet roofline, whose latency is a linear form
itself, or a subclass that prices its own way) price each iteration with price_with_decodes.

A steady decode run's figures are sums over its steps of linear forms of a feature vector that
is affine in the KV read (the one feature that grows), itself affine in the step: so the sum
is the forms at the summed features, the batch size's features at no KV read times the steps
plus the per-token slopes times the summed reads (`decode_run_totals`), kept per batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from costmodel.plan import Tile

if TYPE_CHECKING:
    from costmodel.cost import IterationCost
    from costmodel.price import CostModel


@dataclass(frozen=True, eq=False)
class StretchPrices:
    """Each iteration's latency, and the sums the record needs over the first `done` of them."""

    latencies_s: list[float]
    model: Any  # the CostModel
    features: list[list[float]]  # per iteration (empty where `costs` priced them)
    distinct_layers: list[float]  # expected distinct experts summed over layers, per iteration
    prefill_tokens: list[int]  # prompt tokens entering the stack, per iteration
    prefill_layer_tokens: list[int]
    costs: list[IterationCost]  # per iteration, where they were priced one by one

    def totals(self, done: int) -> dict[str, Any]:
        """The record's figures over the first `done` iterations (Recorder.iteration_row)."""
        if self.costs:
            ran = self.costs[:done]
            from core.records import prefill_tokens_once  # noqa: PLC0415  (records imports us)
            return {"prefill_tokens": sum(prefill_tokens_once(c) for c in ran),
                    "prefill_layer_tokens": sum(c.prefill_layer_tokens for c in ran),
                    "energy_j": sum(c.energy_j for c in ran), "flops": sum(c.flops for c in ran),
                    "expert_bytes": sum(c.hbm_bytes.expert_weights for c in ran),
                    "hbm_bytes": sum(c.hbm_bytes.total for c in ran),
                    "kv_read_bytes": sum(c.hbm_bytes.kv_read for c in ran)}
        cm = self.model
        # [FEATURES] each summed over the iterations in order, as np.sum(axis=0) adds them,
        # without building the array (this runs once per stretch)
        x = [sum(column) for column in zip(*self.features[:done], strict=True)]
        r = cm._linear.dot(x).tolist()
        energy, flops, hbm, _link = cm._figures(r, sum(self.latencies_s[:done]),
                                                sum(self.distinct_layers[:done]))
        return {"prefill_tokens": sum(self.prefill_tokens[:done]),
                "prefill_layer_tokens": sum(self.prefill_layer_tokens[:done]),
                "energy_j": energy, "flops": flops, "expert_bytes": hbm.expert_weights,
                "hbm_bytes": hbm.total, "kv_read_bytes": hbm.kv_read}


def price_stretch(cm: CostModel, num_decodes: int, kv_tokens: int,
                  kv_tokens_window: Sequence[int], steps: Sequence[Sequence[Tile]]
                  ) -> StretchPrices:
    """CostModel.price_stretch (see the module note)."""
    from costmodel.price import CostModel  # noqa: PLC0415  (price imports us)
    n = num_decodes
    windows = kv_tokens_window if len(kv_tokens_window) else [0] * len(steps)
    if cm.measured is None or type(cm).price_with_decodes is not CostModel.price_with_decodes:
        costs = [cm.price_with_decodes(n, kv_tokens + j * n, windows[j], tiles)
                 for j, tiles in enumerate(steps)]
        return StretchPrices([c.latency_s for c in costs], cm, [], [], [], [], costs)
    measured, per_tile_s = cm.measured, cm.profile.request_overhead_s
    latencies, features, distinct, prefill, layer_tokens = [], [], [], [], []
    for j, tiles in enumerate(steps):
        agg: dict[tuple[int, int], list[int]] = {}
        embed, _tokens, tokens_x_layers, num_logits = cm._fold_tiles(agg, tiles)
        if n:
            cm._add_decodes(agg, n, kv_tokens + j * n, windows[j])
        logits, embedded = n + num_logits, embed + n
        x, segments, _experts, distinct_layers = cm._features(agg, logits, embedded)
        # price_with_decodes's latency: the same calls, the same additions in the same order
        latencies.append(measured.latency_s(segments, logits, embedded) + per_tile_s * (n + len(tiles)))
        features.append(x)
        distinct.append(distinct_layers)
        prefill.append(embed)
        layer_tokens.append(tokens_x_layers)
    return StretchPrices(latencies, cm, features, distinct, prefill, layer_tokens, [])


# the forms at no KV read, per token read, per windowed token read; distinct experts x layers
DecodeRunForm = tuple[list[float], list[float], list[float], float]


def decode_run_totals(cm: CostModel, num: int, kv_tokens: int, kv_tokens_window: int,
                      window_growth: int, steps: int, latency_s: float) -> dict[str, Any]:
    """The record's figures summed over `steps` decode iterations of `num` whole-stack decodes
    taking `latency_s` in all, the first reading kv_tokens (kv_tokens_window on sliding-window
    layers) as in price_decodes, each later one num (window_growth) more: the same sums as
    `price_decodes` of each step would give, up to rounding (see the module note)."""
    form = cm._decode_run_forms.get(num)
    if form is None:
        def forms(kv: int, kv_window: int) -> tuple[list[float], float]:
            agg: dict[tuple[int, int], list[int]] = {}
            cm._add_decodes(agg, num, kv, kv_window)
            x, _segments, _experts, distinct_layers = cm._features(agg, num, num)
            return cm._linear.dot(x).tolist(), distinct_layers  # [forms]
        (r0, distinct_layers), (r1, _), (r1w, _) = forms(0, 0), forms(1, 0), forms(0, 1)
        if not cm.model.sliding_window:  # _add_decodes reads kv_tokens on every layer
            r1w = r0
        form = cm._decode_run_forms[num] = (
            r0, [b - a for a, b in zip(r0, r1, strict=True)],
            [b - a for a, b in zip(r0, r1w, strict=True)], distinct_layers)
    r0, per_read, per_window_read, distinct_layers = form
    triangle = steps * (steps - 1) // 2  # sum of j over the steps j = 0 .. steps - 1
    reads = steps * kv_tokens + num * triangle  # summed over the steps
    window_reads = steps * kv_tokens_window + window_growth * triangle
    # a few forms: plain floats cost less than numpy's calls
    r = [steps * a + reads * b + window_reads * c
         for a, b, c in zip(r0, per_read, per_window_read, strict=True)]
    energy, flops, hbm, _link = cm._figures(r, latency_s, steps * distinct_layers)
    return {"energy_j": energy, "flops": flops, "expert_bytes": hbm.expert_weights,
            "hbm_bytes": hbm.total, "kv_read_bytes": hbm.kv_read}
