"""A study: what a user writes (YAML or flags) to compare policies on one setup and workload.

The default study is the public layered-prefill setup: Qwen3-30B-A3B on H100s with TP 2,
long-document (arxiv-long) prompts with Poisson arrivals, chunked prefill at 512 tokens against
layered prefill. Every policy of a study sees the same arrivals (same seed, same workload).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from costmodel import ConfigError, CostModel, Parallelism, load_model, resolve_profile
from costmodel.model import DTYPE_CHOICES, canonical_dtype
from costmodel.profile import Profile
from sim.cluster import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS, SimResult, simulate
from traces import TraceError, Workload, WorkloadSpec, build_workload


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model: str = "qwen3-30b-a3b"
    gpu: str | None = None  # default: the profile's GPU, else h100
    tp: int = Field(default=2, ge=1)
    ep: int = Field(default=1, ge=1)
    replicas: int = Field(default=1, ge=1)
    router: str = "round-robin"
    policies: list[str] = Field(default_factory=lambda: ["chunked:512", "layered"], min_length=1)
    workload: str = "arxiv-long"
    rate: float | None = Field(default=1.3, gt=0)
    arrival: str = "poisson"
    cv: float = Field(default=1.0, gt=0)
    duration_s: float | None = Field(default=120.0, gt=0)
    num_requests: int | None = Field(default=None, ge=1)
    speed: float = Field(default=1.0, gt=0)
    seed: int = 0
    max_context: int | None = Field(default=None, ge=1)
    slo_ttft_ms: float = Field(default=DEFAULT_SLO_TTFT_MS, gt=0)
    slo_itl_ms: float = Field(default=DEFAULT_SLO_ITL_MS, gt=0)
    profile: str | None = None
    routing_skew: float | None = Field(default=None, ge=0, le=5)
    # None: what the model's config.json says (see costmodel.model.parse_config)
    dtype: str | None = None
    expert_dtype: str | None = None
    kv_cache_dtype: str | None = None
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    block_size: int = Field(default=16, ge=1)
    workers: int = Field(default=1, ge=1)  # processes; round-robin routing only

    @model_validator(mode="after")
    def _caps(self) -> Study:
        if self.duration_s is None and self.num_requests is None:
            raise ValueError("set duration_s or num_requests (or both)")
        return self

    @field_validator("policies")
    @classmethod
    def _distinct(cls, policies: list[str]) -> list[str]:
        dupes = sorted({p for p in policies if policies.count(p) > 1})
        if dupes:  # their results would land in the same folder
            raise ValueError(f"listed twice: {', '.join(dupes)}")
        return policies

    @field_validator("dtype", "expert_dtype", "kv_cache_dtype")
    @classmethod
    def _dtype(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else canonical_dtype(value, DTYPE_CHOICES[str(info.field_name)])

    # ---- building blocks --------------------------------------------------------------------
    def resolved_profile(self) -> Profile:
        prof = resolve_profile(self.gpu or "h100", self.profile)
        if self.gpu and self.profile and prof.gpu != self.gpu.lower():
            raise ConfigError(f"--gpu {self.gpu} but the profile {self.profile} is for '{prof.gpu}'")
        return prof

    def cost_model(self) -> CostModel:
        model = load_model(self.model, dtype=self.dtype, expert_dtype=self.expert_dtype,
                           kv_cache_dtype=self.kv_cache_dtype, routing_skew=self.routing_skew)
        prof = self.resolved_profile()
        return CostModel(model, prof.gpu, prof, Parallelism(self.tp, self.ep))

    def build_workload(self, max_context: int) -> Workload:
        spec = WorkloadSpec(workload=self.workload, rate=self.rate, arrival=self.arrival,
                            cv=self.cv, duration_s=self.duration_s,
                            num_requests=self.num_requests, speed=self.speed, seed=self.seed,
                            max_context=self.max_context or min(max_context, 16384))
        try:
            return build_workload(spec)
        except TraceError as e:
            raise ConfigError(str(e)) from None

    def setup_line(self, cm: CostModel) -> str:
        par = cm.parallel
        gpus = f"{self.replicas * par.num_gpus} x {cm.hw.name}"
        shape = f"tp {par.tp}" + (f", ep {par.ep}" if par.ep > 1 else "")
        reps = f", {self.replicas} replicas ({self.router})" if self.replicas > 1 else ""
        prof = cm.profile.label
        dt = f", {cm.model.dtype_note}" if cm.model.dtype_note else ""  # nothing when all bf16
        return f"{cm.model.name} on {gpus} ({shape}{reps}{dt}, {prof})"


def load_study(path: str | Path, **overrides: Any) -> Study:
    """Read a YAML study file; flags given on the command line (`overrides`) win."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: study file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study file is a mapping of keys to values")
    return make_study({**raw, **{k: v for k, v in overrides.items() if v is not None}}, source=str(path))


def make_study(values: dict[str, Any], source: str = "flags") -> Study:
    if isinstance(values.get("policies"), str):
        values = {**values, "policies": [p for p in values["policies"].split(",") if p.strip()]}
    try:
        return Study.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "study"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (valid keys: {', '.join(Study.model_fields)})"
            if key == "mxfp4_experts":  # the key before dtypes were keys of their own
                msg = "replaced by expert_dtype (mxfp4 or bf16)"
        if source == "flags":  # name the flag the user typed
            flag = {"duration_s": "duration"}.get(key, key).replace("_", "-")
            raise ConfigError(f"--{flag}: {msg}") from None
        raise ConfigError(f"{source}: key '{key}': {msg}") from None


def run_study(study: Study, *, progress: bool = False, check: bool = False
              ) -> tuple[Workload, CostModel, list[SimResult]]:
    cm = study.cost_model()
    workload = study.build_workload(cm.model.max_context)
    results = [simulate(workload.requests, cm, policy, num_replicas=study.replicas,
                        router=study.router, seed=study.seed, block_size=study.block_size,
                        gpu_memory_utilization=study.gpu_memory_utilization,
                        slo_ttft_ms=study.slo_ttft_ms, slo_itl_ms=study.slo_itl_ms,
                        check=check, progress=progress, workers=study.workers)
               for policy in study.policies]
    return workload, cm, results
