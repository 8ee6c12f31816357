"""Measured kernel tables, and the one interpolation rule that prices from them.

A table holds one operation class's measured latencies: exact-match keys (data type, model
shape), numeric shape axes, and one size axis `x` (tokens, sequence length, message bytes).
Every price taken from a table follows one rule:

    t(shape, x) = roofline(shape, x) * exp(e(shape, x)),     e = log(t_measured / roofline)

e, the log of the measured-to-roofline ratio, is interpolated linearly in the logarithm of each
axis between the nearest measured values on either side (shape axes in the table's order, the
size axis last). A value inside the measured range is therefore a table lookup; only outside it
is e held at the nearest measured value, so that the roofline alone carries the scaling there
(and the profile says so). The roofline has the datasheet peaks (FLOP/s, HBM or link bandwidth)
with efficiencies and a launch cost fitted per class (`calibrate`): its job is to make e smooth,
so that interpolation between measured shapes is good.

No pandas and no torch here: the simulator imports this.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from costmodel.model import DTYPE_BYTES

LAUNCH_S = 5e-6  # the unfitted roofline's fixed cost
Columns = Mapping[str, Any]  # arrays over rows, or scalars for one shape


@dataclass(frozen=True)
class Hardware:
    """Datasheet peaks for the roofline that normalises measured times."""

    peak_flops: float  # dense bf16
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # bidirectional, as quoted


@dataclass(frozen=True)
class Roofline:
    """r = overhead_s + max(flops / (peak * compute_eff), bytes / (bandwidth * memory_eff)).

    The datasheet one has efficiencies 1 and LAUNCH_S; `calibrate` fits all three per class."""

    compute_eff: float = 1.0
    memory_eff: float = 1.0
    overhead_s: float = LAUNCH_S

    def time_s(self, work: Work, hw: Hardware) -> Any:
        compute = work.flops / (hw.peak_flops * work.peak_scale * self.compute_eff)
        memory = (work.hbm_bytes / hw.hbm_bytes_per_s
                  + work.link_bytes / (hw.link_bytes_per_s / 2)) / self.memory_eff
        if isinstance(compute, float) and isinstance(memory, float):
            return self.overhead_s + (compute if compute > memory else memory)
        return self.overhead_s + np.maximum(compute, memory)

    def affine(self, at_0: Work, at_1: Work, hw: Hardware) -> tuple[float, float, float, float]:
        """`time_s` of a work affine in some x, from its work at x = 0 and 1, as
        (overhead_s, compute_s per x, memory_s per x, memory_s at 0): then
        time_s = overhead_s + max(x compute_s, x memory_s + memory_s at 0), with no FLOPs at 0."""
        compute = (at_1.flops - at_0.flops) / (hw.peak_flops * at_1.peak_scale * self.compute_eff)
        memory_0, memory_1 = ((w.hbm_bytes / hw.hbm_bytes_per_s
                               + w.link_bytes / (hw.link_bytes_per_s / 2)) / self.memory_eff
                              for w in (at_0, at_1))
        if at_0.flops:
            raise ValueError("affine: the work has FLOPs at x = 0")
        return self.overhead_s, compute, memory_1 - memory_0, memory_0


@dataclass(frozen=True)
class Work:
    flops: Any  # arrays over a table's rows, or floats for one shape
    hbm_bytes: Any
    link_bytes: Any
    peak_scale: Any  # 2 where fp8 tensor cores run the FLOPs


def _bytes_per(dtype: Any) -> Any:
    if isinstance(dtype, str):
        return DTYPE_BYTES[dtype]
    return np.vectorize(lambda d: DTYPE_BYTES[str(d)], otypes=[float])(dtype)


def _fp8_scale(dtype: Any) -> Any:
    return np.where(dtype == "fp8", 2.0, 1.0) if not isinstance(dtype, str) else (
        2.0 if dtype == "fp8" else 1.0)


def _work(flops: Any, hbm: Any, link: Any = 0.0, scale: Any = 1.0) -> Work:
    return Work(flops, hbm, link, scale)  # arrays of rows, or floats for one shape


def _gemm_work(c: Columns) -> Work:
    m, n, k = c["m"], c["n"], c["k"]
    hbm = (m * k + k * n) * _bytes_per(c["dtype"]) + 2 * m * n
    return _work(2 * m * n * k, hbm, 0.0, _fp8_scale(c["dtype"]))


def _moe_work(c: Columns) -> Work:
    n, h, inter = c["num_tokens"], c["hidden"], c["inter_per_gpu"]
    e_total, e_gpu, k = c["num_experts"], c["experts_per_gpu"], c["topk"]
    routed = n * k * e_gpu / e_total  # token-expert pairs this GPU computes
    distinct = e_gpu * (1 - (1 - k / e_total) ** n)  # uniform occupancy: bytes follow it
    hbm = distinct * 3 * h * inter * _bytes_per(c["dtype"]) + 2 * 2 * h * n
    # MXFP4 experts run their FLOPs in bf16 (w4a16): only fp8 doubles the peak
    return _work(2 * 3 * h * inter * routed, hbm, 0.0, _fp8_scale(c["dtype"]))


def _causal_pairs(s: Any, w: Any) -> Any:
    """Query-key pairs of a causal prompt of s tokens, through a window of w keys (0: none)."""
    if isinstance(s, int | float) and isinstance(w, int | float):
        return s * (s + 1) / 2 if not w or s <= w else w * (w + 1) / 2 + w * (s - w)
    return np.where((w == 0) | (s <= w), s * (s + 1) / 2, w * (w + 1) / 2 + w * (s - w))


def _prefill_work(c: Columns) -> Work:
    b, s, heads, kv, d = c["batch"], c["isl"], c["num_heads"], c["num_kv_heads"], c["head_dim"]
    hbm = b * s * d * (2 * heads * 2 + 2 * kv * _bytes_per(c["kv_dtype"]))
    return _work(4 * b * heads * d * _causal_pairs(s, c["window"]), hbm)


def _decode_work(c: Columns) -> Work:
    b, heads, kv, d, w = c["batch"], c["num_heads"], c["num_kv_heads"], c["head_dim"], c["window"]
    ctx = c["context"]
    if isinstance(ctx, int | float) and isinstance(w, int | float):
        ctx = min(ctx, w) if w else ctx
    elif isinstance(w, int | float):  # one shape's contexts (the fast-forward's)
        ctx = np.minimum(ctx, w) if w else ctx
    else:
        ctx = np.where(w > 0, np.minimum(ctx, np.where(w > 0, w, 1)), ctx)
    hbm = b * ctx * 2 * kv * d * _bytes_per(c["kv_dtype"]) + 2 * 2 * b * heads * d
    return _work(4 * b * heads * d * ctx, hbm)


def _allreduce_work(c: Columns) -> Work:
    g = c["num_gpus"]
    return _work(0.0, 0.0, 2 * (g - 1) / g * c["message_bytes"])


def _alltoall_work(c: Columns) -> Work:
    g = c["num_gpus"]
    return _work(0.0, 0.0, (g - 1) / g * c["message_bytes"])


@dataclass(frozen=True)
class TableSpec:
    op_class: str
    keys: tuple[str, ...]  # matched exactly
    axes: tuple[str, ...]  # interpolated, in this order
    x: str  # the size axis, interpolated last
    held_out_axis: str  # interior values of this axis are held out to estimate the error
    work: Callable[[Columns], Work]


SPECS: dict[str, TableSpec] = {s.op_class: s for s in (
    TableSpec("dense_gemm", ("dtype",), ("n", "k"), "m", "n", _gemm_work),
    TableSpec("expert_gemm", ("dtype", "distribution", "hidden", "inter", "num_experts", "topk"),
              ("inter_per_gpu", "experts_per_gpu"), "num_tokens", "inter_per_gpu", _moe_work),
    TableSpec("prefill_attn", ("kv_dtype", "window", "head_dim", "num_kv_heads"),
              ("num_heads", "batch"), "isl", "num_heads", _prefill_work),
    TableSpec("decode_attn", ("kv_dtype", "window", "head_dim", "num_kv_heads"),
              ("num_heads", "batch"), "context", "num_heads", _decode_work),
    TableSpec("allreduce", ("num_gpus",), (), "message_bytes", "message_bytes", _allreduce_work),
    TableSpec("alltoall", ("num_gpus",), (), "message_bytes", "message_bytes", _alltoall_work),
)}


class Curve:
    """log(t / roofline) against log(x) for one shape, evaluated by linear interpolation."""

    def __init__(self, log_x: list[float], e: list[float], source: str) -> None:
        self.log_x, self.e, self.source = log_x, e, source
        self._arrays = (np.asarray(log_x), np.asarray(e))
        self.x_range = (math.exp(log_x[0]), math.exp(log_x[-1]))

    def ratio(self, x: float) -> float:
        """exp(e) at x: measured time over roofline time (held constant beyond the range).
        numpy's log and exp, not math's: on SIMD builds they differ from libm by an ulp at about
        one value in thirty, and `ratios` (the steady fast-forward's prices) must be matched."""
        return float(np.exp(self.e_at(float(np.log(x)) if x > 0 else self.log_x[0])))

    def ratios(self, xs: np.ndarray) -> np.ndarray:
        """`ratio` at every x of `xs`."""
        u = np.log(xs) if xs.min() > 0 else np.where(xs > 0, np.log(np.where(xs > 0, xs, 1.0)),
                                                      self.log_x[0])
        return np.exp(np.interp(u, *self._arrays))  # type: ignore[no-any-return]

    def e_at(self, u: float) -> float:
        """e at log x = u: np.interp's arithmetic, step for step, so that e taken one at a time
        equals e taken in an array (`ratios`)."""
        lx, es = self.log_x, self.e
        if u <= lx[0]:
            return es[0]
        if u >= lx[-1]:
            return es[-1]
        j = bisect_right(lx, u) - 1
        if lx[j] == u:
            return es[j]
        return (es[j + 1] - es[j]) / (lx[j + 1] - lx[j]) * (u - lx[j]) + es[j]


def _blend(lx_lo: list[float], e_lo: list[float], lx_hi: list[float], e_hi: list[float],
           w: float) -> tuple[list[float], list[float]]:
    """(1 - w) e_lo + w e_hi on the union of both grids: both are linear between its points, so
    interpolating the blend there is interpolating each and blending."""
    grid = np.union1d(lx_lo, lx_hi)
    mixed = (1 - w) * np.interp(grid, lx_lo, e_lo) + w * np.interp(grid, lx_hi, e_hi)
    return grid.tolist(), mixed.tolist()


_RANK = {"table": 0, "interpolated": 1, "extrapolated": 2}


def _worse(a: str, b: str) -> str:
    return a if _RANK[a] >= _RANK[b] else b


class KernelTable:
    """One class's measured rows (columns of equal length) with latency in seconds."""

    def __init__(self, spec: TableSpec, columns: dict[str, np.ndarray], latency_s: np.ndarray,
                 source: dict[str, Any], roofline: Roofline | None = None) -> None:
        self.spec, self.columns, self.latency_s, self.source = spec, columns, latency_s, source
        self.roofline = roofline or Roofline()
        self._e: np.ndarray | None = None
        self._hw: Hardware | None = None

    def __len__(self) -> int:
        return len(self.latency_s)

    def log_ratio(self, hw: Hardware) -> np.ndarray:
        if self._e is None or self._hw != hw:
            self._e = np.log(self.latency_s / self.roofline.time_s(self.spec.work(self.columns), hw))
            self._hw = hw
        return self._e

    def to_json(self) -> dict[str, Any]:
        cols = {k: [v if isinstance(v, str) else float(v) for v in arr.tolist()]
                for k, arr in self.columns.items()}
        return {"columns": cols, "latency_s": [float(f"{t:.5g}") for t in self.latency_s.tolist()],
                "source": self.source, "roofline": asdict(self.roofline)}

    @classmethod
    def from_json(cls, op_class: str, raw: Mapping[str, Any]) -> KernelTable:
        spec = SPECS[op_class]
        cols = {k: np.asarray(v) for k, v in raw["columns"].items()}
        need = set(spec.keys) | set(spec.axes) | {spec.x}
        missing = sorted(need - set(cols))
        if missing:
            raise ValueError(f"table '{op_class}' lacks columns {missing}")
        return cls(spec, cols, np.asarray(raw["latency_s"], dtype=float), dict(raw.get("source", {})),
                   Roofline(**raw.get("roofline", {})))

    def with_roofline(self, roofline: Roofline) -> KernelTable:
        return KernelTable(self.spec, self.columns, self.latency_s, self.source, roofline)

    def curve(self, target: Mapping[str, Any], hw: Hardware) -> Curve | None:
        """The curve along x for one shape. A shape whose keys no row has takes the measured
        ratio of the nearest measured shape with the same categorical keys (nearest in the log of
        its numeric keys; source "nearest measured shape ..."), or None when there is none."""
        mask = np.ones(len(self), dtype=bool)
        for key in self.spec.keys:
            mask &= self.columns[key] == target[key]
        idx = np.nonzero(mask)[0]
        nearest = ""
        if not len(idx):
            idx, nearest = self._nearest_shape(target)
            if not len(idx):
                return None
        log_x, e, source = self._along_axes(idx, self.spec.axes, target, self.log_ratio(hw))
        return Curve(log_x, e, f"nearest measured shape ({nearest})" if nearest else source)

    def _nearest_shape(self, target: Mapping[str, Any]) -> tuple[np.ndarray, str]:
        numeric = [k for k in self.spec.keys if not isinstance(target[k], str)]
        mask = np.ones(len(self), dtype=bool)
        for key in self.spec.keys:
            if key not in numeric:
                mask &= self.columns[key] == target[key]
        idx = np.nonzero(mask)[0]
        if not len(idx) or not numeric:
            return np.zeros(0, dtype=int), ""
        shapes = np.stack([self.columns[k][idx].astype(float) for k in numeric], axis=1)
        want = np.array([max(float(target[k]), 1e-9) for k in numeric])
        distance = np.abs(np.log(np.maximum(shapes, 1e-9) / want)).sum(axis=1)
        best = shapes[int(np.argmin(distance))]
        keep = np.all(shapes == best, axis=1)
        return idx[keep], ", ".join(f"{k} {v:g}" for k, v in zip(numeric, best, strict=True))

    def _along_axes(self, idx: np.ndarray, axes: tuple[str, ...], target: Mapping[str, Any],
                    e_all: np.ndarray) -> tuple[list[float], list[float], str]:
        if not axes:
            xs = self.columns[self.spec.x][idx].astype(float)
            ux, inv = np.unique(xs, return_inverse=True)
            mean_e = np.bincount(inv, weights=e_all[idx]) / np.bincount(inv)  # repeats: their mean
            return np.log(ux).tolist(), mean_e.tolist(), "table"
        axis, rest = axes[0], axes[1:]
        col = self.columns[axis][idx].astype(float)
        vals = np.unique(col)
        v = float(target[axis])
        if v in vals:
            return self._along_axes(idx[col == v], rest, target, e_all)
        if v < vals[0] or v > vals[-1]:
            near = vals[0] if v < vals[0] else vals[-1]
            lx, e, _ = self._along_axes(idx[col == near], rest, target, e_all)
            return lx, e, "extrapolated"
        lo, hi = vals[vals < v][-1], vals[vals > v][0]
        lx_lo, e_lo, s_lo = self._along_axes(idx[col == lo], rest, target, e_all)
        lx_hi, e_hi, s_hi = self._along_axes(idx[col == hi], rest, target, e_all)
        w = (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
        grid, mixed = _blend(lx_lo, e_lo, lx_hi, e_hi, w)
        return grid, mixed, _worse(_worse(s_lo, s_hi), "interpolated")


class Surface:
    """A curve along x for each measured value of a second axis (batch), for 2-D lookups."""

    def __init__(self, table: KernelTable, target: Mapping[str, Any], axis: str, hw: Hardware) -> None:
        idx = np.ones(len(table), dtype=bool)
        for key in table.spec.keys:
            idx &= table.columns[key] == target[key]
        values = sorted({float(v) for v in table.columns[axis][idx]})
        self.log_b: list[float] = []
        self.curves: list[Curve] = []
        for b in values:
            c = table.curve({**target, axis: b}, hw)
            if c is not None:
                self.log_b.append(math.log(b))
                self.curves.append(c)
        self._at: dict[float, Curve] = {}
        self.source = "table"
        for c in self.curves:
            self.source = _worse(self.source, c.source)

    def __bool__(self) -> bool:
        return bool(self.curves)

    def _bracket(self, b: float) -> tuple[int, float]:
        """(i, w): b lies between measured batch sizes i - 1 and i, weight w on i; i = 0 (w 0)
        below the first, the last index (w 1) above the last: held constant beyond them."""
        lb = self.log_b
        v = math.log(b) if b > 0 else lb[0]
        if v <= lb[0]:
            return 0, 0.0
        if v >= lb[-1]:
            return len(lb) - 1, 1.0
        i = bisect_right(lb, v)
        return i, (v - lb[i - 1]) / (lb[i] - lb[i - 1])

    def at(self, b: float) -> Curve:
        """The curve along x at batch size b: its neighbours' blend (kept: a replica prices a
        few batch sizes over and over)."""
        curve = self._at.get(b)
        if curve is None:
            i, w = self._bracket(b)
            curve = self.curves[i]
            if i and w != 1.0:
                lo = self.curves[i - 1]
                curve = Curve(*_blend(lo.log_x, lo.e, curve.log_x, curve.e, w), self.source)
            self._at[b] = curve
        return curve

    def ratios(self, b: float, xs: np.ndarray) -> np.ndarray:
        """`ratio` at every x of `xs` (one batch size), as arrays: the same interpolation."""
        return self.at(b).ratios(xs)

    def ratio(self, b: float, x: float) -> float:
        return self.at(b).ratio(x)
