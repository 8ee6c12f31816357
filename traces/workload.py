"""Workload builder: a ``WorkloadSpec`` (what lengths, what arrivals, what caps) -> requests.

Algorithm: one ``numpy.random.default_rng(seed)`` is split with ``spawn(2)`` into an arrival
generator and a length generator, so the arrival times depend only on (seed, arrival process,
rate, cv, caps) and never on the length source, and vice versa; comparing policies or workloads
with the same seed therefore uses identical arrivals.

* Length sources without arrivals ('sharegpt', 'arxiv', a length-statistics CSV, 'arxiv-long',
  'fixed:P:O', vLLM's 'random:IN:OUT[:RATIO]', the older benchmark's
  'random-legacy:IN:OUT:RATIO', 'shared-prefix:N:PREFIX:QUESTION:OUTPUT'
  (traces/shared_prefix.py: its system prompts from the length generator) and a ShareGPT JSON
  file): arrival times come
  from the arrival process at ``rate`` (required) until the cap(s) ``num_requests`` /
  ``duration_s`` (at least one required); lengths are sampled. ``rate = inf`` (vLLM's
  ``--request-rate inf``) puts every arrival at 0 and needs ``num_requests``.
* vLLM's datasets (traces/vllm_datasets.py) draw their lengths as vLLM does from ``seed`` itself
  (not from the length generator below), so the same seed picks vLLM's lengths / conversations;
  they stay independent of the arrivals.
* Real traces ('azure-conv', 'mooncake', an Azure / BurstGPT / Mooncake file): with ``rate=None``
  the trace's own arrival times are replayed divided by ``speed``; with a ``rate`` the arrivals
  are redrawn from the arrival process and the trace's lengths are used in order. Then the caps
  keep arrivals ``t < duration_s`` and the first ``num_requests`` (none: the whole trace).
  ``has_arrival_times`` says which kind a workload is before anything is loaded.

With ``model_context`` set, 'arxiv-long' prompts are clipped to fit that context (after the
preset's own ``max_context`` bound) and ``Workload.clipped`` counts the prompts it shortened;
the description then gives the lengths actually simulated. Other sources are never clipped: a
request that does not fit the model is the simulator's to reject (and report).

Bounds, checked before anything is allocated (each message states its bound): at most
``MAX_REQUESTS`` requests generated (``num_requests``, or ``rate`` x ``duration_s`` expected
arrivals when no count caps them; a replayed trace is bounded by its own file), ``rate`` from
``MIN_RATE`` to ``MAX_RATE``, gamma's ``cv`` in ``CV_RANGE``, ``duration_s`` and every arrival
time at most ``MAX_TIME_S`` (a rate or speed that pushes arrivals past it, or to infinity, is
refused rather than run with infinite times).

Named files ship with the package in ``traces/data/`` (provenance and licences in its README);
``$LAYERSIM_TRACES_DIR``, when set, is searched instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from traces._checks import MAX_TIME_S, MAX_TOKENS, shown
from traces.arrivals import ARRIVAL_KINDS, describe_arrivals, generate_arrivals
from traces.errors import TraceError
from traces.lengths import LengthSampler, LogNormalLengths, TableLengths, arxiv_long, parse_fixed
from traces.loaders import LengthTable, LoadedTrace, load_trace, requests_from_arrays, sniff_format
from traces.request import MOONCAKE_BLOCK_SIZE, Request
from traces.shared_prefix import PREFIX as SHARED_PREFIX
from traces.shared_prefix import SPEC as SHARED_PREFIX_SPEC
from traces.shared_prefix import SharedPrefixLengths, parse_shared_prefix
from traces.vllm_datasets import RandomLengths, ShareGPTLengths, parse_random

NAMED_FILES = {
    "sharegpt": "sharegpt_8k_stats_llama2.csv",
    "arxiv": "arxiv_summarization_4k_stats_llama2.csv",
    "azure-conv": "azure2023_conv.csv",
    "mooncake": "mooncake_synthetic.jsonl",
}
VALID_NAMES = ("sharegpt", "arxiv", "arxiv-long", "azure-conv", "mooncake", "fixed:PROMPT:OUTPUT",
               "random:INPUT:OUTPUT[:RATIO]", "random-legacy:INPUT:OUTPUT:RATIO",
               SHARED_PREFIX_SPEC)


PACKAGED_DATA = Path(__file__).resolve().parent / "data"
# Each generated request is simulated one at a time and held in memory with its records (about
# 1.5 KB: 2,000,000 is some 3 GB and minutes of simulation), twice the 1,000,000 of the fleet
# benchmark (benchmarks/cluster_scale.py).
MAX_REQUESTS = 2_000_000
GENERATED = f"the {MAX_REQUESTS:,} requests a run may generate (each is simulated and kept in memory)"
# Beyond any fleet's arrival rate; rate inf (all at once) is the way to say "faster than any".
# Below MIN_RATE the mean gap exceeds the longest span a run may have (and a gamma draw's scale
# 1/(rate x shape) leaves float range).
MAX_RATE = 1e9
MIN_RATE = 1 / MAX_TIME_S
RATE_RULE = (f"rate must be from {MIN_RATE:g} req/s (one request per {MAX_TIME_S:.0e} s, the "
             f"longest a run may span) to {MAX_RATE:g} req/s (beyond any fleet; rate inf sends "
             "every request at once)")
SPAN = f"{MAX_TIME_S:.0e} s (about 317 years), the longest a run may span"
# Gamma arrivals draw with shape 1/cv^2: past these ends the shape leaves float range (a
# division by zero), and long before them the arrivals are fixed-interval or one burst.
CV_RANGE = (1e-3, 1e3)
CV_RULE = f"cv must be from {CV_RANGE[0]:g} to {CV_RANGE[1]:g} (gamma's shape is 1/cv^2)"


def data_dir() -> Path:
    """``$LAYERSIM_TRACES_DIR`` if set, else the trace files shipped in the package."""
    env = os.environ.get("LAYERSIM_TRACES_DIR")
    if env:
        return Path(env)
    return PACKAGED_DATA


def _positive(value: float | None, label: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise TraceError(f"{label} must be a positive finite number, got {value!r}")


def _positive_int(value: int | None, label: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TraceError(f"{label} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class WorkloadSpec:
    """What to simulate; see the module docstring for how each field is used."""

    workload: str
    rate: float | None = None
    arrival: str = "poisson"
    cv: float = 1.0
    duration_s: float | None = None
    num_requests: int | None = None
    speed: float = 1.0
    seed: int = 0
    max_context: int = 16384  # the arxiv-long preset's bound on prompt + output
    model_context: int | None = None  # the model's context: arxiv-long prompts are clipped to it

    def __post_init__(self) -> None:
        if not isinstance(self.workload, str) or not self.workload:
            raise TraceError(f"workload must be a non-empty string, got {self.workload!r}")
        if self.arrival not in ARRIVAL_KINDS:
            raise TraceError(
                f"unknown arrival process {self.arrival!r}; valid: {', '.join(ARRIVAL_KINDS)}"
            )
        if self.rate != math.inf:  # inf: all at once, as vLLM's --request-rate inf
            _positive(self.rate, "rate")
            if self.rate is not None and not MIN_RATE <= self.rate <= MAX_RATE:
                raise TraceError(RATE_RULE)
        _positive(self.cv, "cv")
        if not CV_RANGE[0] <= self.cv <= CV_RANGE[1]:
            raise TraceError(CV_RULE)
        _positive(self.duration_s, "duration_s")
        _positive(self.speed, "speed")
        _positive_int(self.num_requests, "num_requests")
        _positive_int(self.max_context, "max_context")
        _positive_int(self.model_context, "model_context")
        if self.duration_s is not None and self.duration_s > MAX_TIME_S:
            raise TraceError(f"duration_s must be at most {SPAN}")
        for label, tokens in (("max_context", self.max_context), ("model_context", self.model_context)):
            if tokens is not None and tokens > MAX_TOKENS:
                raise TraceError(f"{label} must be at most {MAX_TOKENS:,} tokens")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TraceError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.cv != 1.0 and self.arrival != "gamma":
            raise TraceError("cv applies only to arrival='gamma'")


@dataclass(frozen=True)
class Workload:
    """The requests of a built workload, in arrival order with req_id 0..n-1."""

    requests: tuple[Request, ...]
    skipped_zero: int
    description: str
    clipped: int = 0  # prompts shortened to fit the model's context (arxiv-long only)


def resolve_workload(
    name: str, max_context: int = 16384
) -> LoadedTrace | LengthTable | LengthSampler | RandomLengths | ShareGPTLengths:
    """Map a workload name or path to a loaded trace, a length table, a length sampler or one
    of vLLM's datasets."""
    if name.startswith(SHARED_PREFIX):
        return parse_shared_prefix(name)
    if name == "arxiv-long":
        return arxiv_long(max_context)
    if name.startswith("fixed:"):
        return parse_fixed(name)
    if name.startswith(("random:", "random-legacy:")):
        return parse_random(name)
    if name in NAMED_FILES:
        path = data_dir() / NAMED_FILES[name]
        if not path.is_file():
            why = ("LAYERSIM_TRACES_DIR names a folder without it" if os.environ.get("LAYERSIM_TRACES_DIR")
                   else "the package's trace data was not installed")
            raise TraceError(f"workload {name!r} needs {path}, which is missing ({why})")
        return load_trace(path)
    file = _file(name)
    if file is not None:
        return load_trace(file)
    raise TraceError(
        f"unknown workload {shown(name)} (and no such file); valid: {', '.join(VALID_NAMES)}, "
        "or a path to an Azure/BurstGPT/Mooncake trace, a length-statistics CSV or a ShareGPT JSON"
    )


def _file(name: str) -> Path | None:
    """``name`` as an existing file, or None: also for a name no file can have (too long, a
    NUL byte, ``~user`` of no user), which is then an unknown workload rather than a crash."""
    try:
        path = Path(name).expanduser()
        return path if path.is_file() else None
    except (OSError, ValueError, RuntimeError):
        return None


def has_arrival_times(name: str) -> bool:
    """Whether workload ``name`` is a trace with its own arrival times (replayable); False for
    length statistics, presets, and names that are neither (``build_workload`` says why)."""
    if name in ("azure-conv", "mooncake"):
        return True
    if name in NAMED_FILES or name == "arxiv-long" or name.startswith(
            ("fixed:", "random:", "random-legacy:", SHARED_PREFIX)):
        return False
    path = _file(name)
    try:
        return path is not None and sniff_format(path) not in ("length-stats", "sharegpt-json")
    except TraceError:
        return False


def generation_problem(rate: float | None, duration_s: float | None,
                       num_requests: int | None) -> str | None:
    """Why drawing arrivals with these caps would generate more than ``MAX_REQUESTS`` requests
    (None when it would not): ``num_requests`` over it, or, without a count, ``rate`` x
    ``duration_s`` expected arrivals over it."""
    if num_requests is not None:
        return f"more than {GENERATED}" if num_requests > MAX_REQUESTS else None
    if rate is None or duration_s is None or math.isinf(rate):
        return None
    expected = rate * duration_s
    if expected <= MAX_REQUESTS:
        return None
    return (f"rate {rate:g} req/s over {duration_s:g} s draws about {expected:.3g} requests, more "
            f"than {GENERATED}; lower the rate or the duration, or cap with num_requests")


def _check_span(times: np.ndarray, cause: str) -> None:
    """Arrivals past ``MAX_TIME_S`` (or infinite, from a rate or speed too small) are refused:
    the run would report infinite or meaningless durations."""
    last = float(times.max()) if len(times) else 0.0
    if last <= MAX_TIME_S:
        return
    reach = "never gives a finite arrival time" if not math.isfinite(last) else (
        f"puts arrivals at {last:.3g} s, beyond the {SPAN}")
    raise TraceError(f"{cause} {reach}")


def _span_text(span: float) -> str:
    """Seconds below 10 minutes, then minutes below 2 hours, then hours."""
    if span >= 7200:
        return f"{span / 3600:.1f} h"
    if span >= 600:
        return f"{span / 60:.0f} min"
    return f"{span:.0f} s" if span >= 10 else f"{span:.2g} s"


def _assemble(
    times: np.ndarray, prompt: np.ndarray, output: np.ndarray, skipped: int, head: str,
    duration_s: float | None, clipped: int = 0, replay: bool = False, at_once: bool = False,
    hash_ids: list[tuple[int, ...]] | None = None, hash_block_size: int = MOONCAKE_BLOCK_SIZE,
) -> Workload:
    requests = requests_from_arrays(times, prompt, output, hash_ids, hash_block_size)
    span = duration_s if duration_s is not None else (float(times[-1]) if len(times) else 0.0)
    if at_once:
        text = f"{head}, {len(requests)} requests at t = 0"
    elif replay:  # the rate the replay actually offers: requests over the window they arrive in
        rate = len(requests) / span if span > 0 else 0.0
        rate_text = f"{rate:.1f}" if rate >= 0.95 else f"{rate:.2g}"
        text = f"{head}, {rate_text} req/s over {_span_text(span)}, {len(requests)} requests"
    else:
        text = f"{head}, {len(requests)} requests over {_span_text(span)}"
    if skipped:
        text += f" ({skipped} zero-token rows skipped)"
    if clipped:
        text += (f"; {clipped} of {len(requests)} prompts clipped to fit the model's context, "
                 f"simulated prompts median {np.median(prompt):.0f} / p90 "
                 f"{np.percentile(prompt, 90):.0f} tokens")
    return Workload(requests=requests, skipped_zero=skipped, description=text, clipped=clipped)


def _from_trace(spec: WorkloadSpec, trace: LoadedTrace, arr_rng: np.random.Generator) -> Workload:
    reqs = trace.requests
    hash_ids = [r.hash_ids for r in reqs] if any(r.hash_ids for r in reqs) else None
    prompt = np.fromiter((r.prompt_tokens for r in reqs), dtype=np.int64, count=len(reqs))
    output = np.fromiter((r.output_tokens for r in reqs), dtype=np.int64, count=len(reqs))
    label = f"{spec.workload} ({trace.source})" if spec.workload in NAMED_FILES else trace.source
    if spec.rate is None:
        times = np.fromiter((r.arrival_s for r in reqs), dtype=np.float64, count=len(reqs))
        with np.errstate(over="ignore"):  # an overflow to inf is refused just below, in words
            times = times / spec.speed
        _check_span(times, f"speed {spec.speed:g} (the trace's span divided by it)")
        head = f"{label}: real arrivals replayed (x{spec.speed:g})"
    else:
        if spec.speed != 1.0:
            raise TraceError("speed applies only when a trace replays its own arrivals "
                             "(no rate given)")
        n = len(reqs) if spec.num_requests is None else min(len(reqs), spec.num_requests)
        times = generate_arrivals(
            spec.arrival, spec.rate, arr_rng, cv=spec.cv, n=n, duration_s=spec.duration_s
        )
        _check_span(times, f"rate {spec.rate:g} req/s is too small: it")
        arrivals = describe_arrivals(spec.arrival, spec.rate, spec.cv)
        head = f"{label}: the trace's lengths in order, {arrivals} (rate given: own arrivals not replayed)"
    keep = len(times)
    if spec.duration_s is not None:
        keep = int(np.searchsorted(times, spec.duration_s, side="left"))
    if spec.num_requests is not None:
        keep = min(keep, spec.num_requests)
    return _assemble(times[:keep], prompt[:keep], output[:keep], trace.skipped_zero, head,
                     spec.duration_s, replay=spec.rate is None, at_once=spec.rate == math.inf,
                     hash_ids=None if hash_ids is None else hash_ids[:keep])


def build_workload(spec: WorkloadSpec) -> Workload:
    """Build the requests described by ``spec``; the same spec always gives the same requests."""
    arr_rng, len_rng = np.random.default_rng(spec.seed).spawn(2)
    source = resolve_workload(spec.workload, spec.max_context)
    if isinstance(source, LoadedTrace):
        return _from_trace(spec, source, arr_rng)
    skipped = 0
    sampler: LengthSampler | RandomLengths | ShareGPTLengths
    if isinstance(source, LengthTable):
        sampler = TableLengths(source)
        skipped = source.skipped_zero
        head = sampler.describe()
        if spec.workload in NAMED_FILES:
            head = f"{spec.workload}: {head}"
    else:
        sampler = source
        head = sampler.describe()
    if spec.rate is None:
        raise TraceError(
            f"workload {spec.workload!r} has no arrival times: give rate (req/s) for the "
            f"{spec.arrival} arrival process"
        )
    if spec.duration_s is None and spec.num_requests is None:
        raise TraceError(
            f"workload {spec.workload!r} needs a cap: give duration_s and/or num_requests"
        )
    if spec.speed != 1.0:
        raise TraceError(f"speed applies only when a trace replays its own arrivals; workload "
                         f"{spec.workload!r} has none")
    too_many = generation_problem(spec.rate, spec.duration_s, spec.num_requests)
    if too_many:
        raise TraceError(f"{'num_requests' if spec.num_requests else 'rate x duration_s'}: "
                         f"{too_many}")
    times = generate_arrivals(
        spec.arrival, spec.rate, arr_rng, cv=spec.cv, n=spec.num_requests,
        duration_s=spec.duration_s,
    )
    _check_span(times, f"rate {spec.rate:g} req/s is too small: it")
    if isinstance(sampler, (RandomLengths, ShareGPTLengths)):
        prompt, output = sampler.sample_seeded(len(times), spec.seed)
    else:
        prompt, output = sampler.sample(len(times), len_rng)
    clipped = 0
    if isinstance(sampler, LogNormalLengths) and spec.model_context is not None:
        # the same as drawing with the smaller bound (same draws), but counted
        prompt, output, clipped = _clip_to_context(prompt, output, spec.model_context)
    head = f"{head}, {describe_arrivals(spec.arrival, spec.rate, spec.cv)}"
    if isinstance(sampler, SharedPrefixLengths):  # after the lengths: their draws unchanged
        return _assemble(times, prompt, output, skipped, head, spec.duration_s,
                         at_once=spec.rate == math.inf,
                         hash_ids=sampler.hash_ids(len(times), len_rng),
                         hash_block_size=sampler.prefix_len)
    return _assemble(times, prompt, output, skipped, head, spec.duration_s, clipped,
                     at_once=spec.rate == math.inf)


def _clip_to_context(prompt: np.ndarray, output: np.ndarray, context: int
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """Clip as ``LogNormalLengths`` does (outputs keep their draw, prompts give way) to
    ``context``; return the new lengths and how many requests changed."""
    out = np.clip(output, 1, max(1, context - 1))
    pro = np.clip(prompt, 1, np.maximum(1, context - out))
    return pro, out, int(np.count_nonzero((pro != prompt) | (out != output)))
