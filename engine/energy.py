"""GPU energy from NVML's cumulative energy counter (pynvml, imported only when a GPU is used).

An iteration's energy is the counter's difference between consecutive reads, one read per
iteration (re-read after idle waits), so the read's own latency never sits inside a token gap
twice. Idle power is the median of power
readings over a quiet second before serving; the engine reports it separately so dynamic
energy (total minus idle power times duration) can be read off. On the CPU nothing is measured.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any


class EnergyMeter:
    def __init__(self, index: int) -> None:
        import pynvml  # optional dependency (nvidia-ml-py): only GPU runs need it

        self._nv: Any = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.energy_j()  # fails here, not mid-run, on boards without the counter

    def energy_j(self) -> float:
        return float(self._nv.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1e3  # mJ -> J

    def power_w(self) -> float:
        return float(self._nv.nvmlDeviceGetPowerUsage(self.handle)) / 1e3  # mW -> W

    def idle_power_w(self, seconds: float = 1.0) -> float:
        time.sleep(0.3)  # let clocks settle after the warm-up
        readings = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            readings.append(self.power_w())
            time.sleep(0.05)
        return statistics.median(readings)

    def close(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception:  # shutting down a half-initialised library is not worth an error
            pass


def open_meter(device_type: str, index: int | None) -> EnergyMeter | None:
    """A meter for a CUDA device, or None (CPU, no pynvml, no counter) with a note on stderr."""
    if device_type != "cuda":
        return None
    try:
        return EnergyMeter(index or 0)
    except Exception as e:  # ImportError or pynvml's NVMLError family
        print(f"engine: no NVML energy counter ({type(e).__name__}: {e}); energy not measured",
              file=sys.stderr)
        return None
