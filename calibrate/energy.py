"""Energy: NVML's total-energy counter read around windows of repeated launches, and the fit.

Method. Before the grid, idle power is read from nvmlDeviceGetPowerUsage and one idle window
is read from the energy counter. During the grid, selected shapes are launched back to back for
at least 200 ms (the counter updates too coarsely for single kernels) and the counter (mJ) is
read after a device sync on both sides. Non-negative least squares then fits
    E = idle_w * t + j_per_flop * FLOPs + j_per_hbm_byte * bytes
over all windows, rows weighted by 1/E so that small windows count as much as large ones.
pynvml is imported only inside NvmlMeter, so the fit runs (and is tested) without it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import nnls

MIN_WINDOW_S = 0.2


@dataclass(frozen=True)
class EnergyWindow:
    duration_s: float
    flops: float
    hbm_bytes: float
    energy_j: float


@dataclass(frozen=True)
class EnergyFit:
    idle_w: float
    j_per_flop: float
    j_per_hbm_byte: float
    median_rel_err: float
    worst_rel_err: float
    n_windows: int


def fit_energy(windows: Sequence[EnergyWindow]) -> EnergyFit:
    """NNLS of energy on (time, FLOPs, bytes); columns normalised so their scales (1, 1e12,
    1e10) do not make the problem ill-conditioned."""
    if len(windows) < 3:
        raise ValueError("need at least 3 energy windows to fit 3 coefficients")
    A = np.array([[w.duration_s, w.flops, w.hbm_bytes] for w in windows], dtype=float)  # [W, 3]
    e = np.array([w.energy_j for w in windows], dtype=float)  # [W]
    if (e <= 0).any():
        raise ValueError("energy readings must be positive")
    Aw = A / e[:, None]  # [W, 3] relative weighting: each row's target becomes 1
    norms = np.linalg.norm(Aw, axis=0)
    norms[norms == 0] = 1.0
    x, _ = nnls(Aw / norms, np.ones_like(e))
    coef = x / norms  # [3]
    rel = np.abs(A @ coef / e - 1.0)  # [W]
    return EnergyFit(idle_w=float(coef[0]), j_per_flop=float(coef[1]), j_per_hbm_byte=float(coef[2]),
                     median_rel_err=float(np.median(rel)), worst_rel_err=float(rel.max()),
                     n_windows=len(windows))


class NvmlMeter:
    """The NVML handle of one GPU: power and the cumulative energy counter."""

    def __init__(self, index: int) -> None:
        import pynvml  # optional dependency: imported here only

        self._nv = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def energy_j(self) -> float:
        return float(self._nv.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1e3  # mJ -> J

    def power_w(self) -> float:
        return float(self._nv.nvmlDeviceGetPowerUsage(self.handle)) / 1e3  # mW -> W

    def info(self) -> dict[str, Any]:
        nv = self._nv

        def text(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        return {"nvml_device_name": text(nv.nvmlDeviceGetName(self.handle)),
                "driver_version": text(nv.nvmlSystemGetDriverVersion())}

    def idle(self, sync: Callable[[], None], seconds: float = 1.0) -> tuple[float, EnergyWindow]:
        """Median idle power over `seconds`, and the same interval as an energy window."""
        sync()
        time.sleep(0.3)  # let clocks drop after CUDA init
        e0, t0 = self.energy_j(), time.perf_counter()
        readings = []
        while time.perf_counter() - t0 < seconds:
            readings.append(self.power_w())
            time.sleep(0.05)
        e1, t1 = self.energy_j(), time.perf_counter()
        return statistics.median(readings), EnergyWindow(t1 - t0, 0.0, 0.0, e1 - e0)

    def window(self, run: Callable[[], None], sync: Callable[[], None], per_call_s: float,
               flops: float, hbm_bytes: float, min_s: float = MIN_WINDOW_S) -> EnergyWindow:
        """Launch `run` back to back for at least `min_s`; FLOPs and bytes are per call."""
        # Batches of ~50 ms between syncs: short kernels are launch-bound, so a call count
        # estimated from their device time alone could take far longer than min_s on the host.
        batch = max(1, min(4096, int(np.ceil(0.05 / max(per_call_s, 1e-7)))))
        sync()
        e0, t0 = self.energy_j(), time.perf_counter()
        done = 0
        while True:
            for _ in range(batch):
                run()
            done += batch
            sync()
            if time.perf_counter() - t0 >= min_s:
                break
        e1, t1 = self.energy_j(), time.perf_counter()
        return EnergyWindow(t1 - t0, flops * done, hbm_bytes * done, e1 - e0)

    def close(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception:  # shutting down a library that failed halfway is not worth an error
            pass
