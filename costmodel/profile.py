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
+ overhead_s per launch; collectives use the link bandwidth. Classes in `tables` (measured
kernel latencies, see costmodel/kernel_tables.py) are priced from them instead. An iteration adds
iteration_overhead_s once and layer_overhead_s for every layer that runs any tile: the serving
engine's host time (Python, small unfused kernels, page gathers) that kernel timings do not see;
`calibrate` fits both from timed engine iterations. Energy of an iteration is
(busy_w or idle_w) * time * GPUs + j_per_flop * FLOPs + j_per_hbm_byte * HBM bytes
+ j_per_link_byte * link bytes; between iterations a GPU draws idle_w.
Without a profile, `default_profile` derives all of this from the datasheet preset.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from functools import lru_cache
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
    idle_w: float = Field(ge=0)  # between iterations
    # Static power while kernels run (clocks up); None: the same as idle_w. Measured GPUs draw
    # far more static power busy than idle, so one figure would misprice one or the other.
    busy_w: float | None = Field(default=None, ge=0)
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
    # serving-engine time per request in the iteration (scheduling, sampling, detokenising),
    # fitted to measured serving runs (sim/silicon.py); 0 where none were fitted
    request_overhead_s: float = Field(default=0.0, ge=0)
    ops: dict[str, OpParams]
    energy: EnergyParams
    provenance: dict[str, Any] = Field(default_factory=dict)
    fit_errors: dict[str, Any] = Field(default_factory=dict)
    # Measured kernel tables by operation class (costmodel/kernel_tables.py); a class with a
    # table is priced from it, the others by the roofline with `ops`' efficiencies.
    tables: dict[str, Any] = Field(default_factory=dict)

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

    @property
    def label(self) -> str:
        """What priced the run, for headers: e.g. 'measured-kernel profile (vllm 0.24.0, ...)'."""
        if self.tables:
            versions = ", ".join(self.provenance.get("framework_versions", []))
            return f"measured-kernel profile ({versions})" if versions else "measured-kernel profile"
        return "calibrated profile" if self.is_calibrated else "datasheet profile"

    def accuracy_line(self) -> str:
        """One line for every result table: how far predictions priced by this profile were
        from measurements they were not fitted to, or that nothing measured backs them. Fit
        records a hand-written or older profile lacks read as unknown, never as an error."""
        if not self.tables and not self.is_calibrated:
            return ("error against measurements: none known: datasheet peaks and guessed "
                    "efficiencies (a guess)")
        return f"error against measurements: {self._engine_error()}; {self._energy_error()}"

    def _engine_error(self) -> str:
        engine = _record(self.fit_errors.get("engine_overhead"))
        held = _record(engine.get("held_out"))
        figures = [held.get(k) for k in ("ttft_median_abs_err", "ttft_p90_abs_err",
                                         "tpot_median_abs_err", "tpot_p90_abs_err")]
        rows = held.get("rows")
        counted = isinstance(rows, int) and not isinstance(rows, bool) and rows > 0
        if not (counted and all(_is_number(f) for f in figures)):
            return "no measured serving runs (the engine's own time is a guess)"
        ttft, ttft90, tpot, tpot90 = figures
        measured = (f"mean TTFT {ttft:.0%} (median; p90 {ttft90:.0%}), mean TPOT {tpot:.0%} "
                    f"(p90 {tpot90:.0%}) on {rows} held-out measured vLLM runs "
                    f"({engine.get('file', '?')})")
        donor = engine.get("transferred_from")
        if donor:
            return (f"engine overhead not measured on {self.gpu} but transferred from {donor} "
                    f"(a guess here); on {donor}: {measured}")
        return measured

    def _energy_error(self) -> str:
        fit = _record(self.fit_errors.get("energy"))
        held = _record(fit.get("held_out"))
        if not (_is_number(held.get("median_rel_err")) and _is_number(held.get("p90_rel_err"))):
            own = _record(self.provenance.get("energy"))
            if own.get("measured") is True and _is_number(own.get("median_rel_err")):
                return (f"energy fitted to this GPU's measured power, {own['median_rel_err']:.0%} "
                        "median error on the windows it was fitted to (no held-out figure)")
            return "energy a datasheet guess"
        error = f"{held['median_rel_err']:.0%} (p90 {held['p90_rel_err']:.0%})"
        source = str(fit.get("source", ""))
        if "transferred" in source and "not transferred" not in source:
            return (f"energy fitted to another GPU's measured power and transferred (a guess "
                    f"here; held-out error there {error})")
        return f"energy {error} on held-out measured power"


def _record(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        if path.suffix == ".gz":
            with gzip.open(path, "rt") as f:
                raw = json.load(f)
        else:
            raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: profile file not found") from None
    except (OSError, EOFError) as e:  # a damaged .gz
        raise ConfigError(f"{path}: cannot read: {e}") from None
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
    """Atomic: write a sibling temp file, then rename, so an interrupted run leaves no half file.

    A profile with measured tables is written compactly (its tables hold ~10^5 numbers); a
    path ending in .gz is gzip-compressed, with no timestamp so the bytes depend only on it."""
    compact = bool(profile.tables)
    text = json.dumps(profile.model_dump(), indent=None if compact else 2, sort_keys=True,
                      separators=(",", ":") if compact else None) + "\n"
    if Path(path).suffix == ".gz":
        data = gzip.compress(text.encode(), mtime=0)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
    else:
        atomic_write(path, lambda tmp: tmp.write_text(text))


DATASHEET = "datasheet"  # --profile datasheet: today's guesses, for comparison


@lru_cache(maxsize=8)
def _shipped(path: Path) -> Profile:
    """Shipped profiles are read once per process: each holds ~10^5 table values, and a study or
    a replay of many runs resolves the same one again and again (a Profile is immutable)."""
    return load_profile(path)


@lru_cache(maxsize=8)
def _profile_file(digest: str, path: Path) -> Profile:
    """A profile file read once per content (its SHA-256; the path only reads it), as the
    shipped ones are, and for the same reason: without it every study of a replay or a search
    loaded its own copy, and each copy (~85 MB of tables) lived on in reference cycles until a
    full collection. Keyed by content, not by path and mtime: a file rewritten within the
    file system's mtime granularity at the same size is still read anew."""
    return load_profile(path)


def forget_profile_files() -> None:
    """Drop the profile files read so far (a caller done with temporary ones)."""
    _profile_file.cache_clear()


def resolve_profile(gpu: str, profile_path: str | Path | None = None) -> Profile:
    """An explicit file (or 'datasheet'), else the profile shipped for this GPU (fitted to
    measured kernel tables for h100, h200 and a100), else the datasheet."""
    if profile_path is not None and str(profile_path) == DATASHEET:
        return default_profile(load_gpu(gpu))
    if profile_path is not None:
        path = Path(profile_path)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except (OSError, ValueError):
            return load_profile(path)  # its own one-line error
        return _profile_file(digest, path)
    for name in (f"{gpu.lower()}.json", f"{gpu.lower()}.json.gz"):
        if (SHIPPED_DIR / name).is_file():
            return _shipped(SHIPPED_DIR / name)
    return default_profile(load_gpu(gpu))
