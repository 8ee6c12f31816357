"""The table interpolation rule (costmodel/kernel_tables.py) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from costmodel.held_out import held_out_errors
from costmodel.kernel_tables import SPECS, Curve, Hardware, KernelTable, Roofline, Surface

HW = Hardware(peak_flops=1e15, hbm_bytes_per_s=3e12, link_bytes_per_s=9e11)


def allreduce_table(ratios: dict[float, float]) -> KernelTable:
    """An all-reduce table whose measured time is `ratio` x the datasheet roofline."""
    spec = SPECS["allreduce"]
    sizes = np.array(sorted(ratios))
    cols = {"num_gpus": np.full(len(sizes), 2.0), "message_bytes": sizes}
    roof = Roofline().time_s(spec.work(cols), HW)
    lat = roof * np.array([ratios[s] for s in sizes])
    return KernelTable(spec, cols, lat, {})


def gemm_table(e_of_n: dict[int, float], ms: tuple[int, ...] = (1, 64, 4096)) -> KernelTable:
    """A GEMM table, k = 1024, with log(measured / roofline) = e_of_n[n] at every m."""
    spec = SPECS["dense_gemm"]
    rows = [(n, m) for n in sorted(e_of_n) for m in ms]
    cols = {"dtype": np.array(["bfloat16"] * len(rows)), "n": np.array([float(n) for n, _ in rows]),
            "k": np.full(len(rows), 1024.0), "m": np.array([float(m) for _, m in rows])}
    roof = Roofline().time_s(spec.work(cols), HW)
    lat = roof * np.exp([e_of_n[n] for n, _ in rows])
    return KernelTable(spec, cols, lat, {})


def test_exact_shape_returns_the_measured_ratio() -> None:
    t = allreduce_table({1024: 2.0, 4096: 3.0, 16384: 5.0})
    curve = t.curve({"num_gpus": 2.0}, HW)
    assert curve is not None and curve.source == "table"
    assert curve.ratio(4096) == pytest.approx(3.0)


def test_size_between_measurements_interpolates_in_log_log() -> None:
    t = allreduce_table({1024: 2.0, 4096: 8.0})
    curve = t.curve({"num_gpus": 2.0}, HW)
    assert curve is not None
    # halfway in log size: log ratio halfway between log 2 and log 8 -> ratio 4
    assert curve.ratio(2048) == pytest.approx(4.0)


def test_beyond_the_grid_the_roofline_carries_the_scaling() -> None:
    t = allreduce_table({1024: 2.0, 4096: 3.0})
    curve = t.curve({"num_gpus": 2.0}, HW)
    assert curve is not None
    assert curve.ratio(1 << 30) == pytest.approx(3.0)  # last measured ratio, held
    assert curve.ratio(1) == pytest.approx(2.0)


def test_unmeasured_shape_interpolates_between_neighbours() -> None:
    t = gemm_table({1024: 0.0, 4096: math.log(4.0)})
    curve = t.curve({"dtype": "bfloat16", "n": 2048.0, "k": 1024.0}, HW)
    assert curve is not None and curve.source == "interpolated"
    assert curve.ratio(64) == pytest.approx(2.0)  # geometric midpoint of ratios 1 and 4
    outside = t.curve({"dtype": "bfloat16", "n": 65536.0, "k": 1024.0}, HW)
    assert outside is not None and outside.source == "extrapolated"
    assert outside.ratio(64) == pytest.approx(4.0)
    assert t.curve({"dtype": "fp8", "n": 1024.0, "k": 1024.0}, HW) is None  # no such rows


def test_surface_interpolates_across_batch() -> None:
    spec = SPECS["decode_attn"]
    rows = [(b, c) for b in (1.0, 4.0) for c in (128.0, 1024.0)]
    cols = {"kv_dtype": np.array(["bfloat16"] * 4), "window": np.zeros(4), "head_dim": np.full(4, 128.0),
            "num_kv_heads": np.full(4, 2.0), "num_heads": np.full(4, 16.0),
            "batch": np.array([b for b, _ in rows]), "context": np.array([c for _, c in rows])}
    roof = Roofline().time_s(spec.work(cols), HW)
    ratio = np.array([1.0 if b == 1 else 4.0 for b, _ in rows])
    surface = Surface(KernelTable(spec, cols, roof * ratio, {}),
                      {"kv_dtype": "bfloat16", "window": 0.0, "head_dim": 128.0, "num_kv_heads": 2.0,
                       "num_heads": 16.0}, "batch", HW)
    assert surface.ratio(2.0, 300.0) == pytest.approx(2.0)
    assert surface.ratio(4.0, 128.0) == pytest.approx(4.0)


def test_held_out_error_is_zero_on_a_smooth_table_and_exact_on_a_kink() -> None:
    # e linear in log n: every held-out shape is predicted exactly
    smooth = gemm_table({256: 0.0, 512: 0.1, 1024: 0.2, 2048: 0.3, 4096: 0.4})
    errs = held_out_errors(smooth, HW)
    assert errs["median_rel_err"] == pytest.approx(0.0, abs=1e-9)
    assert errs["held_out_rows"] == 2 * 3  # n = 512 and 2048 held out, at 3 sizes each
    # a 1.5x bump at n = 512 alone: predicted 1.0, measured 1.5 -> |1/1.5 - 1| = 1/3
    kink = gemm_table({256: 0.0, 512: math.log(1.5), 1024: 0.0})
    assert held_out_errors(kink, HW)["median_rel_err"] == pytest.approx(1 / 3)


def test_json_round_trip_keeps_every_value() -> None:
    t = gemm_table({1024: 0.0, 4096: 0.5}).with_roofline(Roofline(0.7, 0.8, 6e-6))
    back = KernelTable.from_json("dense_gemm", t.to_json())
    assert back.roofline == Roofline(0.7, 0.8, 6e-6)
    np.testing.assert_allclose(back.latency_s, t.latency_s, rtol=1e-4)
    assert list(back.columns["dtype"]) == list(t.columns["dtype"])
    with pytest.raises(ValueError, match="lacks columns"):
        KernelTable.from_json("dense_gemm", {"columns": {"m": [1]}, "latency_s": [1.0]})


def test_unmeasured_shape_takes_the_nearest_measured_shape() -> None:
    spec = SPECS["decode_attn"]
    rows = [(kv, c) for kv in (2.0, 8.0) for c in (128.0, 1024.0)]
    cols = {"kv_dtype": np.array(["bfloat16"] * 4), "window": np.zeros(4),
            "head_dim": np.full(4, 128.0), "num_kv_heads": np.array([k for k, _ in rows]),
            "num_heads": np.full(4, 16.0), "batch": np.ones(4), "context": np.array([c for _, c in rows])}
    roof = Roofline().time_s(spec.work(cols), HW)
    table = KernelTable(spec, cols, roof * np.array([2.0 if k == 2 else 5.0 for k, _ in rows]), {})
    curve = table.curve({"kv_dtype": "bfloat16", "window": 0.0, "head_dim": 128.0,
                         "num_kv_heads": 3.0, "num_heads": 16.0, "batch": 1.0}, HW)
    assert curve is not None
    assert curve.source == "nearest measured shape (window 0, head_dim 128, num_kv_heads 2)"
    assert curve.ratio(500.0) == pytest.approx(2.0)  # log 3 is nearer log 2 than log 8
    assert table.curve({"kv_dtype": "fp8", "window": 0.0, "head_dim": 128.0, "num_kv_heads": 2.0,
                        "num_heads": 16.0, "batch": 1.0}, HW) is None


def test_a_curve_prices_one_at_a_time_as_np_interp_does_in_an_array() -> None:
    """e_at follows np.interp's arithmetic (slope times offset, plus the left value), so the
    steady fast-forward's array prices and step-by-step's single ones agree to the last bit,
    e and its exp (math.exp and np.exp differ by an ulp at about 3% of these points)."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        lx = np.unique(rng.uniform(0.0, 12.0, int(rng.integers(1, 10))))
        e = rng.normal(0.0, 1.0, len(lx))
        curve = Curve(lx.tolist(), e.tolist(), "table")
        u = np.concatenate([rng.uniform(-1.0, 13.0, 40), lx])  # inside, outside, on the knots
        one_by_one = np.array([curve.e_at(float(v)) for v in u])
        assert one_by_one.tolist() == np.interp(u, lx, e).tolist()
        xs = np.exp(u)
        assert curve.ratios(xs).tolist() == [curve.ratio(float(x)) for x in xs]


def test_a_batch_between_measured_ones_blends_their_curves_on_both_grids() -> None:
    """Batch 2 between measured 1 and 8 (a third of the way in log b): e is 2/3 of the first
    curve's e plus 1/3 of the second's at every x, though they are measured at other contexts."""
    lo = Curve([math.log(100.0), math.log(1000.0)], [0.0, 1.0], "table")
    hi = Curve([math.log(300.0), math.log(3000.0)], [2.0, 0.0], "table")
    surface = Surface.__new__(Surface)
    surface.log_b, surface.curves, surface._at, surface.source = (
        [0.0, math.log(8.0)], [lo, hi], {}, "table")
    for x in (50.0, 100.0, 200.0, 300.0, 700.0, 1000.0, 2000.0, 3000.0, 9000.0):
        want = math.exp(2 / 3 * lo.e_at(math.log(x)) + 1 / 3 * hi.e_at(math.log(x)))
        assert surface.ratio(2.0, x) == pytest.approx(want, rel=1e-12)
    assert surface.at(2.0) is surface.at(2.0)  # kept
    assert surface.at(8.0) is hi and surface.at(0.5) is lo and surface.at(64.0) is hi


@pytest.mark.parametrize("roof", [Roofline(), Roofline(0.4, 0.7, 9e-6)])
@pytest.mark.parametrize("window", [0.0, 128.0])
def test_decode_attention_roofline_is_affine_in_the_context(roof: Roofline, window: float) -> None:
    """Roofline.affine's closed form, from the work at contexts 0 and 1, equals time_s at any
    context: decode attention's FLOPs and bytes are affine in it (below a window's cap)."""
    spec = SPECS["decode_attn"]
    shape = {"kv_dtype": "bfloat16", "window": 0.0, "head_dim": 128.0, "num_kv_heads": 2.0,
             "num_heads": 16.0, "batch": 12}
    overhead_s, compute_s, memory_s, memory0_s = roof.affine(
        spec.work({**shape, "context": 0.0}), spec.work({**shape, "context": 1.0}), HW)
    for ctx in (1.0, 37.5, 127.0, 4096.0, 1e6):
        c = min(ctx, window) if window else ctx
        want = roof.time_s(spec.work({**shape, "window": window, "context": ctx}), HW)
        got = overhead_s + max(c * compute_s, c * memory_s + memory0_s)
        assert got == pytest.approx(want, rel=1e-13)
