"""Request traces and synthetic workloads for layersim (stdlib + numpy + pandas, no torch).

Public API: trace loaders (Azure, BurstGPT, Mooncake, length statistics), arrival processes
(Poisson, Gamma, fixed), length samplers (table, fixed, arxiv-long) and ``build_workload``.
"""

from traces.arrivals import fixed, gamma, generate_arrivals, poisson
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
from traces.workload import (
    Workload,
    WorkloadSpec,
    build_workload,
    data_dir,
    has_arrival_times,
    resolve_workload,
)

__all__ = [
    "FixedLengths",
    "LengthSampler",
    "LengthTable",
    "LoadedTrace",
    "LogNormalLengths",
    "Request",
    "TableLengths",
    "TraceError",
    "Workload",
    "WorkloadSpec",
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
    "load_trace",
    "parse_fixed",
    "poisson",
    "resolve_workload",
    "sniff_format",
]
