"""Request traces and synthetic workloads for layersim (stdlib + numpy + pandas, no torch).

Public API: trace loaders (Azure, BurstGPT, Mooncake, length statistics, vLLM's ShareGPT JSON),
arrival processes (Poisson, Gamma, fixed; rate inf is all at once), length samplers (table,
fixed, arxiv-long, vLLM's random) and ``build_workload``.

The names below load on first use (PEP 562): `from traces._checks import MAX_TOKENS` (the
`explain` command) must not import pandas through the loaders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from costmodel import lazy_exports

if TYPE_CHECKING:
    from traces.arrivals import all_at_once, fixed, gamma, generate_arrivals, poisson
    from traces.errors import TraceError
    from traces.lengths import (
        FixedLengths,
        LengthSampler,
        LogNormalLengths,
        TableLengths,
        arxiv_long,
        parse_fixed,
    )
    from traces.loaders import (
        LengthTable,
        LoadedTrace,
        load_azure,
        load_burstgpt,
        load_length_stats,
        load_mooncake,
        load_trace,
        sniff_format,
    )
    from traces.request import Request
    from traces.vllm_datasets import RandomLengths, ShareGPTLengths, load_sharegpt, parse_random
    from traces.workload import (
        Workload,
        WorkloadSpec,
        build_workload,
        data_dir,
        has_arrival_times,
        resolve_workload,
    )

_MODULES = {
    "traces.arrivals": ("all_at_once", "fixed", "gamma", "generate_arrivals", "poisson"),
    "traces.errors": ("TraceError",),
    "traces.lengths": ("FixedLengths", "LengthSampler", "LogNormalLengths", "TableLengths",
                       "arxiv_long", "parse_fixed"),
    "traces.loaders": ("LengthTable", "LoadedTrace", "load_azure", "load_burstgpt",
                       "load_length_stats", "load_mooncake", "load_trace", "sniff_format"),
    "traces.request": ("Request",),
    "traces.vllm_datasets": ("RandomLengths", "ShareGPTLengths", "load_sharegpt", "parse_random"),
    "traces.workload": ("Workload", "WorkloadSpec", "build_workload", "data_dir",
                        "has_arrival_times", "resolve_workload"),
}
__all__ = [
    "FixedLengths",
    "LengthSampler",
    "LengthTable",
    "LoadedTrace",
    "LogNormalLengths",
    "RandomLengths",
    "Request",
    "ShareGPTLengths",
    "TableLengths",
    "TraceError",
    "Workload",
    "WorkloadSpec",
    "all_at_once",
    "arxiv_long",
    "build_workload",
    "data_dir",
    "fixed",
    "gamma",
    "generate_arrivals",
    "has_arrival_times",
    "load_azure",
    "load_burstgpt",
    "load_length_stats",
    "load_mooncake",
    "load_sharegpt",
    "load_trace",
    "parse_fixed",
    "parse_random",
    "poisson",
    "resolve_workload",
    "sniff_format",
]


__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
