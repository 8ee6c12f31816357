"""Every study setting is a flag of the same name: `--slo-ttft-ms` is the key `slo_ttft_ms`.

The flags are made from the `Study` model itself (sim/study.py), so a key cannot exist without
its flag, and each flag's help shows the key's default. Exceptions in spelling: the key
`duration_s` is the flag `--duration` (seconds); the true/false key `enable_prefix_caching`
is `--enable-prefix-caching` / `--no-prefix-caching` (vLLM's `--no-enable-prefix-caching`
too). vLLM's `--goodput ttft:MS tpot:MS e2el:MS` is
accepted as a way to set `slo_ttft_ms`, `slo_tpot_ms` and `slo_e2el_ms` together.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from costmodel import ConfigError
from sim.study import Study

# What each setting means (the default is added from Study). Keys of capacity searches only.
HELP = {
    "model": "preset, Hugging Face id (Qwen/Qwen3-30B-A3B) or config.json path",
    "gpu": "a100 | h100 | h200 | b200 | cpu (null: the profile's GPU, else h100)",
    "tp": "tensor-parallel GPUs per replica",
    "ep": "expert-parallel groups per replica (GPUs per replica: tp x ep)",
    "replicas": "replicas behind the router",
    "router": "round-robin | least-outstanding | jsq-tokens | power-of-two",
    "policies": "comma-separated: chunked[:BUDGET], layered[:MAX_G], prefill-first, "
                "hybrid[:BUDGET], adaptive[:TBT_MS], file.py:Class, module:Class",
    "workload": "arxiv-long | sharegpt | arxiv | azure-conv | mooncake | fixed:PROMPT:OUTPUT | "
                "random:IN:OUT[:RANGE_RATIO] (vLLM's random dataset) | random-legacy:IN:OUT:RATIO "
                "(the older benchmark_serving.py's: [IN*RATIO, IN]) | a trace file (Azure, "
                "BurstGPT, Mooncake, length statistics, vLLM's ShareGPT JSON)",
    "rate": "arrivals per second, drawn by --arrival; inf: all at once, as vLLM's --request-rate "
            "inf (null: a trace with timestamps replays its own, other workloads 1.3)",
    "arrival": "poisson | gamma | fixed",
    "cv": "coefficient of variation of gamma arrivals",
    "duration_s": "seconds of arrivals (null: a replayed trace's own span, else 120 unless "
                  "--num-requests)",
    "num_requests": "requests to send (null: as many as the duration gives)",
    "speed": "replay a real trace k times faster",
    "seed": "random seed of arrivals and lengths",
    "max_context": "clip drawn prompt lengths to this many tokens (null: 16384 and the model's)",
    "slo_ttft_ms": "SLO: time to first token, ms",
    "slo_itl_ms": "SLO: each request's P99 gap between tokens, ms",
    "slo_tpot_ms": "SLO: time per output token, ms (null: not part of the SLO)",
    "slo_e2el_ms": "SLO: end-to-end latency, ms (null: not part of the SLO)",
    "metric_percentiles": "comma-separated percentiles reported for every latency",
    "profile": "a profile JSON, or 'datasheet' (null: the one shipped for the GPU)",
    "routing_skew": "sigma of expert popularity (null: 1.2 for MoE models)",
    "dtype": "bf16 | fp8: weights (null: the model's config.json)",
    "expert_dtype": "bf16 | fp8 | mxfp4: expert weights (null: the checkpoint's format)",
    "kv_cache_dtype": "bf16 | fp8: the KV cache (null: bf16)",
    "gpu_memory_utilization": "share of GPU memory for weights and KV cache, as vLLM's",
    "block_size": "KV cache block size in tokens, as vLLM's",
    "enable_prefix_caching": "vLLM's automatic prefix caching: requests sharing a prompt prefix "
                             "(Mooncake's hash_ids, shared-prefix:...) reuse its KV blocks; "
                             "--no-prefix-caching to compare",
    "prefill_replicas": "prefill workers of a disaggregated run (with --decode-replicas; "
                        "--replicas is then left out)",
    "decode_replicas": "decode workers of a disaggregated run (with --prefill-replicas)",
    "decode_tp": "tensor-parallel GPUs per decode worker (null: --tp)",
    "decode_policy": "the decode workers' policy (null: each compared policy on both pools)",
    "kv_link_gb_per_s": "each prefill GPU's link to the decode pool, GB/s one way (null: the "
                        "GPU's network port, 50 on H100/H200/B200, 25 on A100)",
    "kv_link_latency_us": "latency of each KV transfer, us (null: 10 across nodes)",
    "stream_kv": "send each iteration's KV as it is made (layered prefill: layer group by "
                 "layer group) instead of the whole prompt's after its first token",
    "async_scheduling": "vLLM's --async-scheduling: each iteration is planned while the one "
                        "before runs, so a request arriving mid-iteration joins the one after next",
    "max_num_seqs": "most requests a replica runs at once, as vLLM's (null: each policy's, 256)",
    "workers": "processes to split the replicas over (round-robin router; results are the same)",
    "ray": "run the workers' shards as tasks on a local Ray instance (pip install "
           "'layersim[ray]'; results are the same)",
    "ray_address": "run the workers' shards on this Ray cluster (--out and streamed parts "
                   "need a folder every node shares)",
    "max_concurrency": "closed loop, as vllm bench serve --max-concurrency: N clients, each sending "
                       "its next request when its previous one finishes; with --rate, requests "
                       "generated at that rate wait for a free client (null: open loop)",
    "stagger_s": "closed loop without a rate: client i sends its first request at i x STAGGER_S / N "
                 "seconds, so that clients do not run in lockstep (null: all at once)",
    "warmup_requests": "first requests simulated but left out of every metric (null: closed loop "
                       "min(N, 10%% of the requests), open loop 0)",
    "target": "capacity: SLO attainment to meet",
    "price_per_gpu_hour": "capacity: dollars per GPU-hour, for the cost per million tokens",
    "start_rate": "capacity: first rate tried per replica (req/s)",
    "split_pools": "capacity and search: the fewest GPUs as a prefill pool and a decode pool "
                   "(at --rate; search: at --target-rate; --tp and --decode-tp per worker) and "
                   "how to split them",
}
CAPACITY_ONLY = ("target", "price_per_gpu_hour", "start_rate", "split_pools")
FLAG_NAMES = {"duration_s": "--duration"}


def flag_name(key: str) -> str:
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def _default(key: str) -> Any:
    field = Study.model_fields[key]
    value = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return "null" if value is None else value


NULL = object()  # `--rate null`: unset what a study file sets


def _type(key: str) -> Any:
    text = str(Study.model_fields[key].annotation)
    base = _base_type(key, text)
    if "None" not in text:
        return base

    def or_null(s: str) -> Any:
        return NULL if s.lower() in ("null", "none") else base(s)
    or_null.__name__ = base.__name__  # argparse's message: "invalid int value: '1e3'"
    return or_null


def _numbers(text: str) -> list[float]:
    """'50,99.9', '50, 99.9' or '50 99.9'; an empty entry (',,') is no number, so an error."""
    return [float(x) for x in re.split(r"\s*,\s*|\s+", text.strip())]


def _base_type(key: str, text: str) -> Any:
    if key == "metric_percentiles":
        _numbers.__name__ = "comma-separated numbers"
        return _numbers
    if key == "policies" or "str" in text:
        return str
    if "int" in text:
        return int
    return float


def add_study_flags(p: argparse.ArgumentParser, capacity: bool = False) -> None:
    p.add_argument("study", nargs="?", help="a YAML study file (flags override its keys)")
    for key in Study.model_fields:
        if key in CAPACITY_ONLY and not capacity:
            continue
        if Study.model_fields[key].annotation is bool:
            p.add_argument(flag_name(key), dest=key,
                           action=argparse.BooleanOptionalAction, default=None,
                           help=f"{HELP[key]} (default: {_default(key)})")
            if key == "enable_prefix_caching":
                p.add_argument("--no-prefix-caching", dest=key, action="store_false",
                               default=None, help="the same as --no-enable-prefix-caching")
            continue
        p.add_argument(flag_name(key), dest=key, type=_type(key), default=None,
                       metavar=key.upper(), help=f"{HELP[key]} (default: {_default(key)})")
    p.add_argument("--goodput", nargs="+", metavar="KIND:MS", help="vLLM's spelling of the SLO: "
                   "ttft:MS tpot:MS e2el:MS (sets slo_ttft_ms, slo_tpot_ms, slo_e2el_ms)")
    p.add_argument("--out", type=Path, help="write tables, metrics, study.yaml and report.html "
                   "into this folder (not a study setting)")
    p.add_argument("--json", action="store_true", help="print one JSON object per policy")
    p.add_argument("--save-result", type=Path, metavar="FILE", help="also write vLLM "
                   "benchmark_serving's result JSON (metrics and per-request arrays); with several "
                   "policies one file each, FILE's name plus -POLICY (not a study setting)")
    p.add_argument("--check", action="store_true", help="check every plan's legality (slower)")


def study_values(ns: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, with --goodput unfolded."""
    values = {k: (None if getattr(ns, k) is NULL else getattr(ns, k))
              for k in Study.model_fields if getattr(ns, k, None) is not None}
    goodput = list(getattr(ns, "goodput", None) or [])
    if goodput and ":" not in goodput[-1] and getattr(ns, "study", "") is None:
        ns.study = goodput.pop()  # `--goodput ttft:300 study.yaml`: the file is the study
    for item in goodput:
        kind, _, ms = item.partition(":")
        key = {"ttft": "slo_ttft_ms", "tpot": "slo_tpot_ms", "e2el": "slo_e2el_ms"}.get(kind)
        try:
            value = float(ms)
        except ValueError:
            key = None
        if key is None:
            raise ConfigError(f"--goodput {item}: write ttft:MS, tpot:MS or e2el:MS")
        if key in values and values[key] != value:
            raise ConfigError(f"--goodput {item} and {flag_name(key)} {values[key]:g} disagree")
        values[key] = value
    return values
