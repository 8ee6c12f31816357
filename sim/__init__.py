"""The discrete-event simulator (SimPy): replicas, routers, clusters, studies. No torch.

The names below load on first use, so that importing a leaf module does not import SimPy:
core/result.py reads the results folder's file names from sim.results, and the engine, which
uses core, imports no SimPy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["simulate", "SimResult", "DEFAULT_SLO_TTFT_MS", "DEFAULT_SLO_ITL_MS", "ROUTERS",
           "make_router", "make_study", "load_study", "run_study"]


def __getattr__(name: str) -> Any:
    if name in ("simulate", "SimResult", "DEFAULT_SLO_TTFT_MS", "DEFAULT_SLO_ITL_MS"):
        from sim import cluster
        return getattr(cluster, name)
    if name in ("ROUTERS", "make_router"):
        from sim import router
        return getattr(router, name)
    if name in ("make_study", "load_study"):  # the Python API: a study from keys or a file
        from sim import study_file
        return getattr(study_file, name)
    if name == "run_study":
        from sim.run import run_study
        return run_study
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
