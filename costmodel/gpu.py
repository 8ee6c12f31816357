"""GPU presets from vendors' datasheets. Calibration profiles (costmodel/profile.py) refine them.

All figures are per GPU. Link bandwidth is NVLink's bidirectional figure as NVIDIA quotes it;
collectives use half of it per direction. Idle power is not on datasheets: the figure is a
typical reading of an idle SXM board under nvidia-smi, a placeholder until `calibrate` measures
it on the user's machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodel.errors import ConfigError


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    hbm_bytes: float  # capacity
    link_bytes_per_s: float  # NVLink, bidirectional
    tdp_w: float
    idle_w: float


GPUS: dict[str, GPUSpec] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): 312 TFLOPS BF16 dense, 2,039 GB/s,
    # 80 GB HBM2e, NVLink 600 GB/s, max TDP 400 W.
    "a100": GPUSpec("a100", 312e12, 2.039e12, 80e9, 600e9, 400.0, 55.0),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM): 989 TFLOPS BF16 dense (1,979 with sparsity),
    # 3.35 TB/s, 80 GB HBM3, NVLink 900 GB/s, up to 700 W.
    "h100": GPUSpec("h100", 989e12, 3.35e12, 80e9, 900e9, 700.0, 70.0),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 989 TFLOPS BF16 dense, 4.8 TB/s,
    # 141 GB HBM3e, NVLink 900 GB/s, up to 700 W.
    "h200": GPUSpec("h200", 989e12, 4.8e12, 141e9, 900e9, 700.0, 75.0),
    # NVIDIA HGX B200 datasheet, per GPU: 2.25 PFLOPS BF16 dense (4.5 with sparsity), 8 TB/s,
    # 180 GB HBM3e, NVLink 5 1.8 TB/s, 1000 W.
    "b200": GPUSpec("b200", 2.25e15, 8.0e12, 180e9, 1800e9, 1000.0, 140.0),
    # A CPU "device" for tests and laptops: figures of a small server core pair, replaced by
    # `calibrate --device cpu`. Not a datasheet.
    "cpu": GPUSpec("cpu", 1.0e11, 2.0e10, 16e9, 1.0e10, 65.0, 10.0),
}


def load_gpu(name: str) -> GPUSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown GPU '{name}' (presets: {', '.join(GPUS)})") from None
