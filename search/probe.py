"""One probe: one simulation of one configuration at one rate, replica count and seed (or, in a
split search, prefill and decode pool sizes).

A probe is a pure function of its inputs: the Study (one policy; rate = replicas x the rate per
replica; seed) and the requests built from it. `run_probe` is what an executor runs; it keeps
the few metrics a search needs (KEEP), rounded through JSON so that a result read back from the
store and one just computed are the same floats.

Its key (`probe_key`) is the SHA-256 of a canonical JSON of everything the simulation reads:
the study's keys (bar those that only steer a search: SEARCH_ONLY), a digest of the requests
themselves (so a trace file edited in place is a new key), digests of the model spec and of
the resolved hardware profile (its measured tables included), the layersim version, a digest
of the simulator's own source (CODE) and the probe format. Two probes with one key are the
same simulation; a search with any other input gets other keys and never reads a stale result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from costmodel.errors import ConfigError
from costmodel.price import CostModel
from costmodel.profile import Profile
from sim.cluster import simulate
from sim.results import layersim_version
from sim.study import COST_KEYS, Study
from traces.request import Request

FORMAT = 1  # bump when a probe's record changes meaning
# What a search reads from a simulation (and what the probe store keeps).
KEEP = ("slo_attainment", "mean_ttft_ms", "p99_ttft_ms", "p99_itl_ms", "energy_per_token_j",
        "total_token_throughput", "request_throughput", "gpus", "replicas", "completed",
        "num_requests", "preemptions")
# Study keys that steer a search but not the simulation (`workers` splits it over processes
# with identical results)
SEARCH_ONLY = ("target", "price_per_gpu_hour", "start_rate", "workers")
# Study keys that `Study.build_workload` reads: two probes equal in these share their requests
WORKLOAD_KEYS = ("workload", "rate", "arrival", "cv", "duration_s", "num_requests", "speed", "seed",
                 "max_context", "max_concurrency", "warmup_requests", "stagger_s")


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


def requests_digest(requests: tuple[Request, ...]) -> str:
    """Over every field of every request, in order (Request is a frozen dataclass: exact repr)."""
    h = hashlib.sha256()
    for r in requests:
        h.update(repr(r).encode())
        h.update(b"\n")
    return h.hexdigest()


# id(profile) -> (the profile, its digest): a shipped profile is one object per process (its
# loader caches it) and holds ~10^5 table values, so it is hashed once, not once per probe
_PROFILE_SHA: dict[int, tuple[Profile, str]] = {}


def profile_digest(profile: Profile) -> str:
    hit = _PROFILE_SHA.get(id(profile))
    if hit is not None and hit[0] is profile:  # the entry holds it: its id cannot be reused
        return hit[1]
    if len(_PROFILE_SHA) >= 32:  # profiles read from files are new objects each time
        _PROFILE_SHA.clear()
    sha = hashlib.sha256(profile.model_dump_json().encode()).hexdigest()  # field order: fixed
    _PROFILE_SHA[id(profile)] = (profile, sha)
    return sha


def cost_model_digest(cm: CostModel) -> str:
    """The model spec and the resolved profile, measured tables included."""
    return sha256_json({"model": repr(cm.model), "profile": profile_digest(cm.profile),
                        "gpu": repr(cm.hw), "tp": cm.parallel.tp, "ep": cm.parallel.ep})


def workload_key(study: Study, max_context: int) -> str:
    return sha256_json({"study": {k: getattr(study, k) for k in WORKLOAD_KEYS},
                        "model_context": max_context})


# The packages whose code decides a simulation's result
CODE = ("core", "costmodel", "policies", "sim", "traces")


@lru_cache(maxsize=1)
def code_digest() -> str:
    """Of every .py file of CODE (path and bytes): the version string stays 0.1.0 across edits
    of the simulator, and a result from other code is a stale result."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in CODE:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def probe_key(study: Study, requests_sha: str, cost_sha: str) -> str:
    settings = study.model_dump(mode="json", exclude=set(SEARCH_ONLY))
    return sha256_json({"format": FORMAT, "layersim": layersim_version(), "code": code_digest(),
                        "study": settings, "requests": requests_sha, "cost_model": cost_sha})


@dataclass(frozen=True)
class ProbeTask:
    """What a worker needs besides the requests (passed apart: shared, see executor.py)."""
    key: str
    study: Study
    cost_sha: str  # cost_model_digest as the driver saw it


@lru_cache(maxsize=16)
def _cost_model(study_json: str, cost_sha: str) -> CostModel:
    """Per worker process, built once: it reads and indexes the profile's tables. Cached by the
    digest too, so a profile file edited in place is read again; and checked against it, so a
    worker never simulates under a key whose inputs it did not see."""
    cm = Study.model_validate_json(study_json).cost_model()
    if cost_model_digest(cm) != cost_sha:
        raise ConfigError("the model or profile files changed while the search ran; run it again")
    return cm


def run_probe(task: ProbeTask, requests: tuple[Request, ...]) -> dict[str, Any]:
    """Simulate the probe; its record: the key and the KEEP metrics (JSON-exact floats)."""
    study = task.study
    cm = _cost_model(study.model_dump_json(include=COST_KEYS), task.cost_sha)
    if study.prefill_replicas is not None:  # a split search's probe: the two pools
        from sim.disagg import run_disaggregated

        # `workers` splits a co-located run over processes; here the search's own are the split
        (result,) = run_disaggregated(study.model_copy(update={"workers": 1}), cm, requests,
                                      check=False)
        return _record(task.key, result.metrics)
    result = simulate(requests, cm, study.policy_factory(study.policies[0]),
                      num_replicas=study.replicas, router=study.router, seed=study.seed,
                      block_size=study.block_size,
                      gpu_memory_utilization=study.gpu_memory_utilization,
                      slo_ttft_ms=study.slo_ttft_ms, slo_itl_ms=study.slo_itl_ms,
                      slo_tpot_ms=study.slo_tpot_ms, slo_e2el_ms=study.slo_e2el_ms,
                      metric_percentiles=study.metric_percentiles,
                      max_concurrency=study.max_concurrency,
                      warmup_requests=study.warmup(len(requests)),
                      enable_prefix_caching=study.enable_prefix_caching,
                      async_scheduling=study.async_scheduling)
    return _record(task.key, result.metrics)


def _record(key: str, metrics: dict[str, Any]) -> dict[str, Any]:
    kept = {k: metrics.get(k) for k in KEEP}
    return json.loads(json.dumps({"key": key, "metrics": kept}))
