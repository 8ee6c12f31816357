"""Hardware profiles: the cost model's fitted parameters, one JSON file per device.

Schema (version 1), written by `calibrate` and read here:

    {
      "schema_version": 1,
      "gpu": "h200",                      # the preset these figures refine
      "peak_flops": 9.89e14,              # optional overrides of the preset's peaks
      "hbm_bytes_per_s": 4.8e12,
      "link_bytes_per_s": 9e11,
      "iteration_overhead_s": 2e-4,       # fixed cost per scheduler iteration (host side)
      "layer_overhead_s": 1e-4,           # optional (default 0): host cost per layer with work
      "ops": {                            # one entry per operation class (OP_CLASSES)
        "dense_gemm": {"compute_eff": 0.8, "memory_eff": 0.85, "overhead_s": 4e-6}, ...
      },
      "energy": {"idle_w": 75, "j_per_flop": 5e-13, "j_per_hbm_byte": 3e-11, "j_per_link_byte": 1e-11},
      "provenance": {...},                # device, driver, CUDA/torch versions, date, grid
      "fit_errors": {...}                 # per class: median and worst held-out relative error
    }

An op's time is max(flops / (peak_flops * compute_eff), bytes / (bandwidth * memory_eff))
+ overhead_s per launch; collectives use the link bandwidth. An iteration adds
iteration_overhead_s once and layer_overhead_s for every layer that runs any tile: the serving
engine's host time (Python, small unfused kernels, page gathers) that kernel timings do not see;
`calibrate` fits both from timed engine iterations. Energy is idle_w * time * GPUs
+ j_per_flop * FLOPs + j_per_hbm_byte * HBM bytes + j_per_link_byte * link bytes.
Without a profile, `default_profile` derives all of this from the datasheet preset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from costmodel.errors import ConfigError
from costmodel.files import atomic_write
from costmodel.gpu import GPUSpec, load_gpu

SCHEMA_VERSION = 1
OP_CLASSES = ("dense_gemm", "expert_gemm", "prefill_attn", "decode_attn", "elementwise",
              "allreduce", "alltoall")
SHIPPED_DIR = Path(__file__).parent / "presets" / "profiles"


class OpParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    compute_eff: float = Field(gt=0, le=1.5)
    memory_eff: float = Field(gt=0, le=1.5)
    overhead_s: float = Field(ge=0)


class EnergyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    idle_w: float = Field(ge=0)
    j_per_flop: float = Field(ge=0)
    j_per_hbm_byte: float = Field(ge=0)
    j_per_link_byte: float = Field(ge=0)


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = SCHEMA_VERSION
    gpu: str
    peak_flops: float | None = Field(default=None, gt=0)
    hbm_bytes_per_s: float | None = Field(default=None, gt=0)
    link_bytes_per_s: float | None = Field(default=None, gt=0)
    iteration_overhead_s: float = Field(ge=0)
    layer_overhead_s: float = Field(default=0.0, ge=0)  # 0: profiles from before it stay valid
    ops: dict[str, OpParams]
    energy: EnergyParams
    provenance: dict[str, Any] = Field(default_factory=dict)
    fit_errors: dict[str, Any] = Field(default_factory=dict)

    def hardware(self) -> GPUSpec:
        """The preset with this profile's measured peaks substituted."""
        base = load_gpu(self.gpu)
        return GPUSpec(
            name=base.name,
            peak_flops=self.peak_flops or base.peak_flops,
            hbm_bytes_per_s=self.hbm_bytes_per_s or base.hbm_bytes_per_s,
            hbm_bytes=base.hbm_bytes,
            link_bytes_per_s=self.link_bytes_per_s or base.link_bytes_per_s,
            tdp_w=base.tdp_w,
            idle_w=self.energy.idle_w,
        )

    @property
    def is_calibrated(self) -> bool:
        return bool(self.provenance.get("calibrated"))


def default_profile(gpu: GPUSpec) -> Profile:
    """Datasheet-only guesses: typical kernel efficiencies and launch costs of a modern GPU.

    Energy coefficients are set so that a kernel at peak compute and peak bandwidth together
    draws about TDP: 70% of the dynamic power budget goes to FLOPs, 30% to HBM traffic.
    """
    dynamic_w = gpu.tdp_w - gpu.idle_w
    gemm = OpParams(compute_eff=0.75, memory_eff=0.85, overhead_s=4e-6)
    return Profile(
        gpu=gpu.name,
        iteration_overhead_s=1e-4,
        ops={
            "dense_gemm": gemm,
            "expert_gemm": OpParams(compute_eff=0.6, memory_eff=0.75, overhead_s=8e-6),
            "prefill_attn": OpParams(compute_eff=0.6, memory_eff=0.8, overhead_s=6e-6),
            "decode_attn": OpParams(compute_eff=0.3, memory_eff=0.7, overhead_s=6e-6),
            "elementwise": OpParams(compute_eff=0.3, memory_eff=0.8, overhead_s=3e-6),
            "allreduce": OpParams(compute_eff=1.0, memory_eff=0.7, overhead_s=1.5e-5),
            "alltoall": OpParams(compute_eff=1.0, memory_eff=0.6, overhead_s=2e-5),
        },
        energy=EnergyParams(
            idle_w=gpu.idle_w,
            j_per_flop=0.7 * dynamic_w / gpu.peak_flops,
            j_per_hbm_byte=0.3 * dynamic_w / gpu.hbm_bytes_per_s,
            j_per_link_byte=0.05 * dynamic_w / gpu.link_bytes_per_s,
        ),
        provenance={"calibrated": False, "source": "datasheet preset and default efficiencies"},
    )


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: profile file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile is a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConfigError(f"{path}: key 'schema_version' is {version!r}; this layersim reads "
                          f"version {SCHEMA_VERSION}")
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: key '{key}': {err['msg']}") from None
    missing = [c for c in OP_CLASSES if c not in profile.ops]
    if missing:
        raise ConfigError(f"{path}: key 'ops' lacks operation classes {missing}")
    load_gpu(profile.gpu)
    return profile


def save_profile(profile: Profile, path: str | Path) -> None:
    """Atomic: write a sibling temp file, then rename, so an interrupted run leaves no half file."""
    text = json.dumps(profile.model_dump(), indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def resolve_profile(gpu: str, profile_path: str | Path | None = None) -> Profile:
    """An explicit file, else a shipped calibrated profile for this GPU, else the datasheet."""
    if profile_path is not None:
        return load_profile(profile_path)
    shipped = SHIPPED_DIR / f"{gpu.lower()}.json"
    if shipped.is_file():
        return load_profile(shipped)
    return default_profile(load_gpu(gpu))
