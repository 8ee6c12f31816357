"""A study: what a user writes (YAML or flags) to compare policies on one setup and workload.

The default study is the public layered-prefill setup: Qwen3-30B-A3B on H100s with TP 2,
long-document (arxiv-long) prompts with Poisson arrivals, chunked prefill at 512 tokens against
layered prefill. Every policy of a study sees the same arrivals (same seed, same workload).

Arrivals (`Study.arrivals`): a trace with timestamps (azure-conv, mooncake, an Azure / BurstGPT /
Mooncake file) replays its own arrivals, the whole trace unless capped, unless `rate` is given;
a length-statistics workload (sharegpt, arxiv, arxiv-long, fixed:P:O, a statistics CSV) draws
arrivals at `rate` (default 1.3 req/s) for `duration_s` (default 120 s unless `num_requests`
caps it). A run with no requests, or none the model can serve, is a ConfigError.

Closed loop (`max_concurrency` N, vLLM's `--max-concurrency`; sim/clients.py): N clients each
send their next request when their previous one finishes. A trace's own arrivals are then not
replayed, only its lengths in order. Without a rate (or with rate inf, vLLM's default) the run
is `num_requests` requests (default 1000, vLLM's --num-prompts); with a rate, requests are
generated at it as above and at most N are in flight. The first `warmup_requests` are simulated
but left out of every metric; the default is min(N, 10% of the requests): one per client, the
first wave, sent together into an idle server (vLLM's own --num-warmups, default 0, runs before
its measured phase, so its figures include that wave: warmup_requests 0 matches them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.metrics import DEFAULT_PERCENTILES
from core.result import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS
from costmodel import ConfigError, CostModel, Parallelism, load_model, resolve_profile
from costmodel.model import DTYPE_CHOICES, canonical_dtype
from costmodel.profile import Profile
from policies.base import Policy
from policies.registry import make_policy
from sim.study_keys import BOUNDS, NAMES, KeyProblem, _read_as
from traces import TraceError, Workload, WorkloadSpec, build_workload, has_arrival_times
from traces.arrivals import describe_arrivals
from traces.request import Request
from traces.workload import (
    CV_RANGE,
    CV_RULE,
    MAX_RATE,
    MIN_RATE,
    RATE_RULE,
    generation_problem,
)

DEFAULT_RATE = 1.3  # req/s, the published study's rate; for workloads without arrival times
DEFAULT_DURATION_S = 120.0  # seconds of drawn arrivals when neither cap is given
DEFAULT_CLOSED_LOOP_REQUESTS = 1000  # vLLM's --num-prompts default
WARMUP_SHARE = 0.1  # closed loop: warm-up is min(clients, this share of the requests)


# The keys Study.cost_model reads: studies equal in these share a cost model (the replay and
# the search build one per distinct set)
COST_KEYS = {"model", "gpu", "tp", "ep", "profile", "routing_skew", "dtype", "expert_dtype",
             "kv_cache_dtype"}


class Study(BaseModel):
    # finite numbers only: rate inf is the one infinity with a meaning (all at once)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    model: str = "qwen3-30b-a3b"
    gpu: str | None = None  # default: the profile's GPU, else h100
    tp: int = Field(default=2, ge=1)
    ep: int = Field(default=1, ge=1)
    replicas: int = Field(default=1, ge=1)
    router: str = "round-robin"
    policies: list[str] = Field(default_factory=lambda: ["chunked:512", "layered"], min_length=1)
    workload: str = "arxiv-long"
    rate: float | None = Field(default=None, gt=0, allow_inf_nan=True)  # None: see `arrivals`
    arrival: str = "poisson"
    cv: float = Field(default=1.0, gt=0)
    duration_s: float | None = Field(default=None, gt=0)  # None: see `arrivals`
    num_requests: int | None = Field(default=None, ge=1)
    speed: float = Field(default=1.0, gt=0)
    seed: int = Field(default=0, ge=0)
    max_context: int | None = Field(default=None, ge=1)
    slo_ttft_ms: float = Field(default=DEFAULT_SLO_TTFT_MS, gt=0)
    slo_itl_ms: float = Field(default=DEFAULT_SLO_ITL_MS, gt=0)
    slo_tpot_ms: float | None = Field(default=None, gt=0)  # None: not part of the SLO
    slo_e2el_ms: float | None = Field(default=None, gt=0)
    metric_percentiles: list[float] = Field(default_factory=lambda: list(DEFAULT_PERCENTILES),
                                            min_length=1)
    profile: str | None = None
    routing_skew: float | None = Field(default=None, ge=0, le=5)
    # None: what the model's config.json says (see costmodel.model.parse_config)
    dtype: str | None = None
    expert_dtype: str | None = None
    kv_cache_dtype: str | None = None
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    block_size: int = Field(default=16, ge=1)
    enable_prefix_caching: bool = True
    async_scheduling: bool = False  # vLLM's --async-scheduling: sim/replica.py
    max_num_seqs: int | None = Field(default=None, ge=1)  # None: each policy's own (256)
    workers: int = Field(default=1, ge=1)  # processes; round-robin routing only
    ray: bool = False  # the workers' shards as tasks on a local Ray instance
    ray_address: str | None = None  # ... or on this Ray cluster
    max_concurrency: int | None = Field(default=None, ge=1)  # None: open loop
    warmup_requests: int | None = Field(default=None, ge=0)  # None: see `warmup`
    stagger_s: float | None = Field(default=None, gt=0)  # None: closed-loop clients start together
    # prefill/decode disaggregation (sim/disagg.py): with both counts the replicas are two pools
    prefill_replicas: int | None = Field(default=None, ge=1)
    decode_replicas: int | None = Field(default=None, ge=1)
    decode_tp: int | None = Field(default=None, ge=1)  # None: tp
    decode_policy: str | None = None  # None: each compared policy on both pools
    kv_link_gb_per_s: float | None = Field(default=None, gt=0)  # None: the GPU's network port
    kv_link_latency_us: float | None = Field(default=None, ge=0)  # None: the preset's
    stream_kv: bool = False  # each tile's KV leaves when made (layered: group by group)
    # capacity searches (sim/capacity.py)
    target: float = Field(default=0.9, gt=0, le=1)
    price_per_gpu_hour: float | None = Field(default=None, ge=0)
    start_rate: float = Field(default=0.5, gt=0)
    split_pools: bool = False  # capacity: the cheapest prefill/decode split at `rate`

    @field_validator("policies")
    @classmethod
    def _distinct(cls, policies: list[str]) -> list[str]:
        if any(not p.strip() for p in policies):
            raise ValueError("an empty policy name (give chunked:512, layered, ...)")
        dupes = sorted({p for p in policies if policies.count(p) > 1})
        if dupes:  # their results would land in the same folder
            raise ValueError(f"listed twice: {', '.join(dupes)}")
        return policies

    @field_validator(*NAMES, mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty; give a value, or null (leave the key out) for the default")
        return value

    @field_validator(*BOUNDS)
    @classmethod
    def _bounded(cls, value: float | None, info: ValidationInfo) -> float | None:
        bound, why = BOUNDS[str(info.field_name)]
        if value is not None and value > bound:
            raise ValueError(f"at most {bound:,} {why}" if isinstance(bound, int)
                             else f"at most {bound:g} {why}")
        return value

    @field_validator("cv", "rate", "start_rate")
    @classmethod
    def _in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        (low, high), rule = ((CV_RANGE, CV_RULE) if info.field_name == "cv"
                             else ((MIN_RATE, MAX_RATE), RATE_RULE))
        if value is not None and not low <= value <= high and value != math.inf:
            raise ValueError(rule)
        return value

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
        with _read_as("profile" if self.profile else "gpu", self.profile or self.gpu):
            prof = resolve_profile(self.gpu or "h100", self.profile)
        if self.gpu and self.profile and prof.gpu != self.gpu.lower():
            raise ConfigError(f"--gpu {self.gpu} but the profile {self.profile} is for '{prof.gpu}'")
        return prof

    def cost_model(self) -> CostModel:
        with _read_as("model", self.model):
            model = load_model(self.model, dtype=self.dtype, expert_dtype=self.expert_dtype,
                               kv_cache_dtype=self.kv_cache_dtype, routing_skew=self.routing_skew)
        prof = self.resolved_profile()
        return CostModel(model, prof.gpu, prof, Parallelism(self.tp, self.ep))

    def decode_cost_model(self, cm: CostModel | None = None) -> CostModel:
        """The decode pool's: the study's own (`cm` when built already) unless decode_tp differs;
        a check it fails names --decode-tp."""
        if self.decode_tp in (None, self.tp):
            return self.cost_model() if cm is None else cm
        try:
            return self.model_copy(update={"tp": self.decode_tp}).cost_model()
        except ConfigError as e:
            raise ConfigError(str(e).replace("--tp", "--decode-tp", 1)) from None

    def decode_worker_gpus(self) -> int:
        return (self.decode_tp or self.tp) * self.ep

    def replays_trace(self) -> bool:
        """Whether the workload's own arrival times are replayed (see the module note)."""
        return (self.rate is None and self.max_concurrency is None
                and has_arrival_times(self.workload))

    def closed_loop_rate(self) -> float | None:
        """Closed loop: the rate requests are generated at (None: all at once)."""
        return None if self.rate is None or math.isinf(self.rate) else self.rate

    def arrivals(self) -> tuple[float | None, float | None]:
        """The (rate, duration_s) the workload is built with: (None, cap or None) for a replay,
        (None, None) for closed-loop clients without a rate."""
        if self.replays_trace():
            return None, self.duration_s
        if self.max_concurrency is not None and self.closed_loop_rate() is None:
            return None, None
        duration = self.duration_s
        if duration is None and self.num_requests is None:
            duration = DEFAULT_DURATION_S
        return (DEFAULT_RATE if self.rate is None else self.rate), duration

    @model_validator(mode="after")
    def _across_keys(self) -> Study:
        """Keys that only make sense together, and at most MAX_REQUESTS requests drawn, checked
        before anything is drawn (a trace's own file bounds a replay, or its lengths in order)."""
        if self.cv != 1.0 and self.arrival != "gamma":
            raise KeyProblem("cv", f"cv applies only to arrival gamma (arrival is {self.arrival})")
        if self.stagger_s is not None and (self.max_concurrency is None or self.closed_loop_rate()):
            raise KeyProblem("stagger_s", "stagger_s spreads the first requests of closed-loop "
                             "clients: it needs max_concurrency and no rate")
        pools = self.prefill_replicas is not None or self.decode_replicas is not None
        if not (pools or self.split_pools):  # keys of the two pools, or of their search
            for key in ("decode_tp", "decode_policy", "kv_link_gb_per_s", "kv_link_latency_us",
                        "stream_kv"):
                if getattr(self, key) not in (None, False):
                    raise KeyProblem(key, f"{key} applies to prefill and decode pools: a run's "
                                     "prefill_replicas and decode_replicas, or the split_pools "
                                     "of capacity and search")
        if has_arrival_times(self.workload):
            return self
        rate, duration_s = self.arrivals()
        num = self.num_requests
        if rate is None and num is None:  # closed-loop clients without a rate
            num = DEFAULT_CLOSED_LOOP_REQUESTS
        problem = generation_problem(rate, duration_s, num)
        if problem:
            key = ("num_requests" if self.num_requests is not None
                   else "duration_s" if self.duration_s is not None else "rate")
            raise KeyProblem(key, problem)
        return self

    def build_workload(self, max_context: int) -> Workload:
        """The requests; arxiv-long prompts are clipped to fit `max_context`, the model's."""
        rate, duration_s = self.arrivals()
        at_once = self.max_concurrency is not None and rate is None
        if at_once:  # closed loop, no rate: lengths only (nominal arrivals, set to 0 below)
            if self.duration_s is not None:
                raise ConfigError("--duration needs --rate with --max-concurrency: without a rate "
                                  "closed-loop clients send --num-requests requests")
            if self.speed != 1.0:
                raise ConfigError("--speed replays a trace's own arrivals; closed-loop clients "
                                  "(--max-concurrency) do not replay them")
        num_requests = self.num_requests
        if at_once and num_requests is None:
            num_requests = DEFAULT_CLOSED_LOOP_REQUESTS
        spec = WorkloadSpec(workload=self.workload, rate=1.0 if at_once else rate,
                            arrival="fixed" if at_once else self.arrival,
                            cv=1.0 if at_once else self.cv, duration_s=duration_s,
                            num_requests=num_requests, speed=self.speed, seed=self.seed,
                            # a max_context below the preset's 16,384 clips like a model's context
                            # would (counted and described); above it, it widens the preset
                            max_context=max(self.max_context or 0, 16384),
                            model_context=min(max_context, self.max_context or max_context))
        try:
            workload = build_workload(spec)
        except TraceError as e:
            raise ConfigError(str(e)) from None
        if not workload.requests:
            raise ConfigError(f"the workload has no requests ({workload.description}); "
                              "raise the rate, the duration or the number of requests")
        if self.max_concurrency is not None:
            workload = self._closed_loop(workload, spec, at_once)
        warm = self.warmup(len(workload.requests))
        if warm:
            workload = replace(workload, description=f"{workload.description}; the first {warm} "
                               "are warm-up, in no metric")
        return workload

    def _closed_loop(self, workload: Workload, spec: WorkloadSpec, at_once: bool) -> Workload:
        """The workload as closed-loop clients send it: every request generated at 0 when there
        is no rate, and a description that says so ("closed loop: N clients[, rate R]")."""
        assert spec.rate is not None and self.max_concurrency is not None
        phrase = describe_arrivals(spec.arrival, spec.rate, spec.cv)
        loop = f"closed loop: {self.max_concurrency} clients"
        text = workload.description
        requests = workload.requests
        if at_once:
            # client i's first request at i * stagger / N: the offsets a long run's clients drift
            # to (the measured runs' TTFT shows no lockstep); the rest wait for a free client
            step = (self.stagger_s or 0.0) / self.max_concurrency
            # (later requests are generated with the last client: sending order stays request order)
            last = self.max_concurrency - 1
            requests = tuple(Request(r.req_id, step * min(i, last), r.prompt_tokens, r.output_tokens)
                             for i, r in enumerate(requests))
            text = re.sub(r", (\d+) requests over [^,;(]+", r", \1 requests", text, count=1)
            if self.stagger_s:
                loop += f", first requests spread over {self.stagger_s:g} s"
        else:
            loop += f", rate {phrase}"
        for old, new in ((f"{phrase} (rate given: own arrivals not replayed)",
                          f"{loop} (own arrivals not replayed)"), (phrase, loop)):
            if old in text:
                return replace(workload, requests=requests, description=text.replace(old, new, 1))
        return replace(workload, requests=requests, description=f"{text}; {loop}")

    def warmup(self, num_requests: int) -> int:
        """Requests left out of the metrics: as given, else min(clients, 10% of the requests)
        for closed-loop clients and none for open-loop arrivals."""
        if self.warmup_requests is not None:
            return self.warmup_requests
        if self.max_concurrency is None:
            return 0
        return min(self.max_concurrency, int(num_requests * WARMUP_SHARE))

    def policy_factory(self, spec: str) -> str | Callable[[], Policy]:
        """The policy as simulate takes it: its spec, or a factory when max_num_seqs is set."""
        if self.max_num_seqs is None:
            return spec
        n = self.max_num_seqs
        return lambda: make_policy(spec, max_num_seqs=n)

    def slo_text(self) -> str:
        """'TTFT <= 2000 ms and per-request P99 ITL <= 100 ms', with TPOT and E2E when set."""
        parts = [f"TTFT <= {self.slo_ttft_ms:g} ms"]
        if self.slo_tpot_ms is not None:
            parts.append(f"TPOT <= {self.slo_tpot_ms:g} ms")
        if self.slo_e2el_ms is not None:
            parts.append(f"E2E <= {self.slo_e2el_ms:g} ms")
        text = ", ".join(parts) + f" and per-request P99 ITL <= {self.slo_itl_ms:g} ms"
        if self.split_pools or self.prefill_replicas is not None:  # core/metrics.py
            text += " (and the gap before the second token)"
        return text

    def refuse_disaggregated(self, command: str) -> None:
        """`command` searches the pools' sizes itself (split_pools): fixed sizes are refused,
        not ignored."""
        if self.prefill_replicas is not None or self.decode_replicas is not None:
            raise ConfigError(f"{command}: prefill_replicas / decode_replicas: {command} "
                              "searches the pools' sizes with split_pools (--split-pools); a "
                              "fixed split runs with `layersim compare` or `simulate`")

    def setup_line(self, cm: CostModel) -> str:
        par = cm.parallel
        gpus = f"{self.replicas * par.num_gpus} x {cm.hw.name}"
        shape = f"tp {par.tp}" + (f", ep {par.ep}" if par.ep > 1 else "")
        reps = f", {self.replicas} replicas ({self.router})" if self.replicas > 1 else ""
        if self.prefill_replicas is not None and self.decode_replicas is not None:
            d_tp = self.decode_tp or par.tp
            n = self.prefill_replicas * par.num_gpus + self.decode_replicas * d_tp * par.ep
            gpus = f"{n} x {cm.hw.name}"
            reps = (f", disaggregated: {self.prefill_replicas} prefill + {self.decode_replicas} "
                    f"decode workers (decode tp {d_tp}), KV "
                    f"{'streamed as made' if self.stream_kv else 'sent after the first token'}")
        if self.split_pools:  # capacity searches the pools' sizes
            gpus = f"{cm.hw.name} workers of {par.num_gpus} GPUs"
            reps = (f", prefill and decode pools (decode tp {self.decode_tp or par.tp}), "
                    "their sizes searched")
        prof = cm.profile.label
        dt = f", {cm.model.dtype_note}" if cm.model.dtype_note else ""  # nothing when all bf16
        return f"{cm.model.name} on {gpus} ({shape}{reps}{dt}, {prof})"


def __getattr__(name: str) -> Any:
    """make_study, load_study and run_study, where the Python API first documented them (their
    modules import this one, so they are looked up on first use)."""
    if name in ("make_study", "load_study"):
        from sim import study_file
        return getattr(study_file, name)
    if name == "run_study":
        from sim.run import run_study
        return run_study
    raise AttributeError(f"module 'sim.study' has no attribute {name!r}")
