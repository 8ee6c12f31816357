"""Decode attention priced from the shipped measured tables (costmodel/measured.py) against the
interpolation rule written out: the fitted roofline of the row shape (capped at the window on a
sliding-window layer, where the tables measure windowed rows) times the measured ratio at the
batch and the uncapped context, one price at a time and as the fast-forward's arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from costmodel import CostModel, Parallelism, load_model, resolve_profile
from costmodel.kernel_tables import SPECS


def _rule(priced, hw, b: int, ctx: float) -> float:  # type: ignore[no-untyped-def]
    target, roof, surface = priced
    t = float(roof.time_s(SPECS["decode_attn"].work({**target, "batch": b, "context": ctx}), hw))
    return t * surface.ratio(b, ctx) if surface is not None else t


@pytest.mark.parametrize("gpu,windowed_rows", [("h100", True), ("a100", False)])
def test_decode_attention_follows_the_rule_on_full_and_window_layers(gpu: str,
                                                                     windowed_rows: bool) -> None:
    mk = CostModel(load_model("gpt-oss-120b"), gpu, resolve_profile(gpu), Parallelism(tp=2)).measured
    assert mk is not None and (mk._decode_win is not None) == windowed_rows
    window = mk.model.sliding_window  # 128
    for n in (1, 3, 24, 200):
        contexts = np.array([5.0, 127.0, 128.0, 129.5, 900.0, 40000.0])
        kv = n * contexts
        kept = n * np.minimum(contexts, window)  # what a window keeps of each request's keys
        full = [_rule(mk._decode, mk.hw, n, c) for c in contexts]
        if windowed_rows:  # the windowed rows at the position; their kernel reads the window
            win = [_rule(mk._decode_win, mk.hw, n, c) for c in contexts]
        else:  # the full-attention rows at the keys the window keeps
            win = [_rule(mk._decode, mk.hw, n, c) for c in np.minimum(contexts, window)]
        assert [mk.decode_attn_s(n, float(k)) for k in kv] == pytest.approx(full, rel=1e-12)
        assert [mk.decode_attn_s(n, float(k), float(w)) for k, w in zip(kv, kept, strict=True)
                ] == pytest.approx(win, rel=1e-12)
        assert mk._decode_attn_many(n, kv, None) == pytest.approx(full, rel=1e-12)
        assert mk._decode_attn_many(n, kv, kept) == pytest.approx(win, rel=1e-12)
        if windowed_rows:  # past the window the kernel time stops growing; the ratio moves on
            assert win[-1] / win[-2] == pytest.approx(
                mk._decode_win[2].ratio(n, contexts[-1]) / mk._decode_win[2].ratio(n, contexts[-2]))
    assert math.isfinite(mk.decode_attn_s(7, 0.0))


def test_prefill_attention_is_remembered_per_shape_and_window() -> None:
    """Chunked prompts price the same chunks request after request, so prefill attention is
    remembered by (sequences, pairs, window pairs): a remembered price is the one computed
    afresh, a window's pairs are part of the key, and the memory is bounded."""
    mk = CostModel(load_model("gpt-oss-120b"), "h100", resolve_profile("h100"),
                   Parallelism(tp=2)).measured
    assert mk is not None
    shapes = [(1, 512 * 513 / 2, None), (1, 512 * 513 / 2, 64 * 128.0), (3, 9e5, None),
              (3, 9e5, 3 * 64 * 128.0)]
    fresh = [mk._prefill_attn_s(*s) for s in shapes]
    assert [mk.prefill_attn_s(*s) for s in shapes] == fresh
    assert [mk.prefill_attn_s(*s) for s in shapes] == fresh  # remembered, now
    assert fresh[0] != fresh[1] and fresh[2] != fresh[3]
    for pairs in range(70_000):
        mk.prefill_attn_s(2, float(pairs))
    assert len(mk._prefill_memo) <= 65536
