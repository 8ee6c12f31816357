"""A study: what a user writes (YAML or flags) to compare policies on one setup and workload.

The default study is the public layered-prefill setup: Qwen3-30B-A3B on H100s with TP 2,
long-document (arxiv-long) prompts with Poisson arrivals, chunked prefill at 512 tokens against
layered prefill. Every policy of a study sees the same arrivals (same seed, same workload).

Arrivals (`Study.arrivals`): a trace with timestamps (azure-conv, mooncake, an Azure / BurstGPT /
Mooncake file) replays its own arrivals, the whole trace unless capped, unless `rate` is given;
a length-statistics workload (sharegpt, arxiv, arxiv-long, fixed:P:O, a statistics CSV) draws
arrivals at `rate` (default 1.3 req/s) for `duration_s` (default 120 s unless `num_requests`
caps it). A run with no requests, or none the model can serve, is a ConfigError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
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
)

from costmodel import ConfigError, CostModel, Parallelism, load_model, resolve_profile
from costmodel.model import DTYPE_CHOICES, canonical_dtype
from costmodel.profile import Profile
from policies.base import Policy
from policies.registry import make_policy
from sim.cluster import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS, SimResult, simulate
from sim.metrics import DEFAULT_PERCENTILES
from traces import TraceError, Workload, WorkloadSpec, build_workload, has_arrival_times

DEFAULT_RATE = 1.3  # req/s, the published study's rate; for workloads without arrival times
DEFAULT_DURATION_S = 120.0  # seconds of drawn arrivals when neither cap is given


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
    rate: float | None = Field(default=None, gt=0)  # None: see `arrivals`
    arrival: str = "poisson"
    cv: float = Field(default=1.0, gt=0)
    duration_s: float | None = Field(default=None, gt=0)  # None: see `arrivals`
    num_requests: int | None = Field(default=None, ge=1)
    speed: float = Field(default=1.0, gt=0)
    seed: int = 0
    max_context: int | None = Field(default=None, ge=1)
    slo_ttft_ms: float = Field(default=DEFAULT_SLO_TTFT_MS, gt=0)
    slo_itl_ms: float = Field(default=DEFAULT_SLO_ITL_MS, gt=0)
    slo_tpot_ms: float | None = Field(default=None, gt=0)  # None: not part of the SLO
    slo_e2el_ms: float | None = Field(default=None, gt=0)
    metric_percentiles: list[float] = Field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    profile: str | None = None
    routing_skew: float | None = Field(default=None, ge=0, le=5)
    # None: what the model's config.json says (see costmodel.model.parse_config)
    dtype: str | None = None
    expert_dtype: str | None = None
    kv_cache_dtype: str | None = None
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    block_size: int = Field(default=16, ge=1)
    max_num_seqs: int | None = Field(default=None, ge=1)  # None: each policy's own (256)
    workers: int = Field(default=1, ge=1)  # processes; round-robin routing only
    # capacity searches (sim/capacity.py)
    target: float = Field(default=0.9, gt=0, le=1)
    price_per_gpu_hour: float | None = Field(default=None, ge=0)
    start_rate: float = Field(default=0.5, gt=0)

    @field_validator("policies")
    @classmethod
    def _distinct(cls, policies: list[str]) -> list[str]:
        dupes = sorted({p for p in policies if policies.count(p) > 1})
        if dupes:  # their results would land in the same folder
            raise ValueError(f"listed twice: {', '.join(dupes)}")
        return policies

    @field_validator("rate", mode="before")
    @classmethod
    def _rate_inf(cls, value: Any) -> Any:
        """'inf' (YAML's `inf` is a string; `.inf` is the number) means all at once, as vLLM's
        --request-rate inf; the workload then needs num_requests."""
        if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity", ".inf"):
            return float("inf")
        return value

    @field_validator("metric_percentiles")
    @classmethod
    def _percentiles(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not 0 < v < 100]
        if bad:
            raise ValueError(f"percentiles must be between 0 and 100, got {bad}")
        return values

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

    def replays_trace(self) -> bool:
        """Whether the workload's own arrival times are replayed (see the module note)."""
        # Hook for a closed-loop `max_concurrency` (vLLM's --max-concurrency), not implemented:
        # like `rate`, it will stop the replay (`and self.max_concurrency is None`), and
        # `arrivals`/`build_workload` will then build the arrivals it implies.
        return self.rate is None and has_arrival_times(self.workload)

    def arrivals(self) -> tuple[float | None, float | None]:
        """The (rate, duration_s) the workload is built with: (None, cap or None) for a replay."""
        if self.replays_trace():
            return None, self.duration_s
        duration = self.duration_s
        if duration is None and self.num_requests is None:
            duration = DEFAULT_DURATION_S
        return (DEFAULT_RATE if self.rate is None else self.rate), duration

    def build_workload(self, max_context: int) -> Workload:
        """The requests; arxiv-long prompts are clipped to fit `max_context`, the model's."""
        rate, duration_s = self.arrivals()
        spec = WorkloadSpec(workload=self.workload, rate=rate, arrival=self.arrival,
                            cv=self.cv, duration_s=duration_s,
                            num_requests=self.num_requests, speed=self.speed, seed=self.seed,
                            max_context=self.max_context or 16384, model_context=max_context)
        try:
            workload = build_workload(spec)
        except TraceError as e:
            raise ConfigError(str(e)) from None
        if not workload.requests:
            raise ConfigError(f"the workload has no requests ({workload.description}); "
                              "raise the rate, the duration or the number of requests")
        return workload

    def policy_factory(self, spec: str) -> str | Callable[[], Policy]:
        """The policy as simulate takes it: its spec, or a factory when max_num_seqs is set."""
        if self.max_num_seqs is None:
            return spec
        n = self.max_num_seqs
        return lambda: make_policy(spec, max_num_seqs=n)

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
    for spec in study.policies:  # every policy checked before the first one runs
        make_policy(spec, max_num_seqs=study.max_num_seqs)
    cm = study.cost_model()
    workload = study.build_workload(cm.model.max_context)
    results = [simulate(workload.requests, cm, study.policy_factory(spec),
                        num_replicas=study.replicas,
                        router=study.router, seed=study.seed, block_size=study.block_size,
                        gpu_memory_utilization=study.gpu_memory_utilization,
                        slo_ttft_ms=study.slo_ttft_ms, slo_itl_ms=study.slo_itl_ms,
                        slo_tpot_ms=study.slo_tpot_ms, slo_e2el_ms=study.slo_e2el_ms,
                        metric_percentiles=study.metric_percentiles,
                        check=check, progress=progress, workers=study.workers)
               for spec in study.policies]
    # what the workload shortened to fit the model, beside what the simulator rejected
    results = [replace(r, metrics={**r.metrics, "clipped_prompts": workload.clipped})
               for r in results]
    return workload, cm, results
