"""Fit the cost model's roofline parameters of one operation class to measured timings.

Method. The cost model prices an op as t = max(F / (P * ce), B / (W * me)) + o * n, with F the
FLOPs, B the bytes, n the launches, P and W the device's peak FLOP/s and bandwidth. Given timed
samples we fit (ce, me, o) by nonlinear least squares on log-time residuals (so a 10 us kernel
counts as much as a 10 ms one), optionally weighted by how often the cost model charges each op
per iteration, from several starts because the max() leaves a parameter flat wherever the other
term binds. One sample in k (phase-shifted, see split) is held out of the fit and the relative
error on those is reported. numpy/scipy only: the unit tests need no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import least_squares

LINK_CLASSES = ("allreduce", "alltoall")
EFF_BOUNDS = (1e-3, 1.5)  # the profile schema accepts efficiencies in (0, 1.5]



@dataclass(frozen=True)
class Sample:
    """One timed shape, with the FLOPs and bytes the cost model counts for it."""
    op_class: str
    shape: dict[str, Any]
    flops: float
    hbm_bytes: float
    link_bytes: float
    launches: float
    time_s: float

    @property
    def bytes(self) -> float:
        return self.link_bytes if self.op_class in LINK_CLASSES else self.hbm_bytes


@dataclass(frozen=True)
class OpFit:
    compute_eff: float
    memory_eff: float
    overhead_s: float
    median_rel_err: float  # on held-out samples (on fitted ones when too few to hold out)
    worst_rel_err: float
    n_fit: int
    n_held_out: int
    fit_median_rel_err: float
    held_out: list[dict[str, Any]] = field(default_factory=list)

    def errors(self) -> dict[str, Any]:
        return {"median_rel_err": self.median_rel_err, "worst_rel_err": self.worst_rel_err,
                "n_fit": self.n_fit, "n_held_out": self.n_held_out,
                "fit_median_rel_err": self.fit_median_rel_err}


def predict(flops: np.ndarray, nbytes: np.ndarray, launches: np.ndarray, peak_flops: float,
            bandwidth: float, compute_eff: float, memory_eff: float, overhead_s: float) -> np.ndarray:
    """The cost model's roofline, vectorised over samples."""
    t_c = flops / (peak_flops * compute_eff)
    t_m = nbytes / (bandwidth * memory_eff)
    return np.maximum(t_c, t_m) + overhead_s * launches  # type: ignore[no-any-return]


def split(n: int, holdout_every: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices to fit and to hold out: one sample in k, when enough remain to fit 3 parameters.

    The held-out phase shifts by one every k samples: grids are nested loops, and a plain
    "every k-th" would hold out the same point of an inner axis of length k every time
    (all the largest token counts, say), which tests extrapolation rather than interpolation.
    """
    idx = np.arange(n)
    k = holdout_every
    held = (idx + idx // k) % k == k - 1 if k > 1 else np.zeros(n, bool)
    if n - held.sum() < 4:
        held[:] = False
    return idx[~held], idx[held]


def _solve(f: np.ndarray, b: np.ndarray, n: np.ndarray, t: np.ndarray, w: np.ndarray, peak: float,
           bw: float, init: tuple[float, float, float]) -> tuple[float, float, float]:
    # Overhead is scaled by the median time so all three unknowns are O(1) for the solver.
    scale = float(np.median(t))
    lo = [np.log(EFF_BOUNDS[0]), np.log(EFF_BOUNDS[0]), 0.0]
    hi = [np.log(EFF_BOUNDS[1]), np.log(EFF_BOUNDS[1]), np.inf]

    sqrt_w = np.sqrt(w / w.mean())

    def resid(z: np.ndarray) -> np.ndarray:
        pred = predict(f, b, n, peak, bw, float(np.exp(z[0])), float(np.exp(z[1])), z[2] * scale)
        return sqrt_w * np.log(np.maximum(pred, 1e-30) / t)  # type: ignore[no-any-return]

    t_min = float(t.min())
    starts = [init]
    for ce in (0.05, 0.3, 1.0):
        for me in (0.05, 0.3, 1.0):
            for o in (0.0, 0.5 * t_min):
                starts.append((ce, me, o))
    best: tuple[float, np.ndarray] | None = None
    for ce, me, o in starts:
        z0 = np.clip([np.log(ce), np.log(me), o / scale], lo, [hi[0], hi[1], 1e12])
        # Plain least squares: timings are already medians, and where the roofline form does
        # not hold exactly (small CPU GEMMs) it spreads the error evenly instead of fitting
        # some shapes perfectly and abandoning the rest, as a robust loss did in our trials.
        r = least_squares(resid, z0, bounds=(lo, hi), x_scale=1.0)
        # Keep the earliest start (the prior) unless a later one is strictly better: a parameter
        # that never binds then stays at its prior instead of drifting to an arbitrary bound.
        if best is None or r.cost < best[0] * (1 - 1e-6) - 1e-12:
            best = (float(r.cost), r.x)
    assert best is not None
    z = best[1]
    return float(np.exp(z[0])), float(np.exp(z[1])), float(z[2] * scale)


def fit_op_class(samples: Sequence[Sample], peak_flops: float, bandwidth: float,
                 holdout_every: int = 4,
                 init: tuple[float, float, float] = (0.5, 0.5, 0.0),
                 weights: Sequence[float] | None = None) -> OpFit:
    """Fit (compute_eff, memory_eff, overhead_s) of one class; `bandwidth` is HBM or link/2.

    `weights` (default 1) say how often the cost model charges each sample's op per iteration
    (per layer vs once, like the LM head), so the fit favours what dominates iteration time.
    """
    if not samples:
        raise ValueError("no samples to fit")
    f = np.array([s.flops for s in samples], dtype=float)
    b = np.array([s.bytes for s in samples], dtype=float)
    n = np.array([s.launches for s in samples], dtype=float)
    t = np.array([s.time_s for s in samples], dtype=float)
    w = np.ones(len(samples)) if weights is None else np.asarray(weights, dtype=float)
    if (t <= 0).any():
        raise ValueError("timings must be positive")
    fit_idx, held_idx = split(len(samples), holdout_every)
    ce, me, o = _solve(f[fit_idx], b[fit_idx], n[fit_idx], t[fit_idx], w[fit_idx], peak_flops,
                       bandwidth, init)
    rel = np.abs(predict(f, b, n, peak_flops, bandwidth, ce, me, o) / t - 1.0)
    report = held_idx if len(held_idx) else fit_idx
    held = [{**samples[i].shape, "measured_s": float(t[i]), "rel_err": float(rel[i])}
            for i in held_idx]
    return OpFit(compute_eff=ce, memory_eff=me, overhead_s=o,
                 median_rel_err=float(np.median(rel[report])), worst_rel_err=float(rel[report].max()),
                 n_fit=len(fit_idx), n_held_out=len(held_idx),
                 fit_median_rel_err=float(np.median(rel[fit_idx])), held_out=held)
