"""The discrete-event simulator (SimPy): replicas, routers, records and metrics. No torch."""

from sim.cluster import DEFAULT_SLO_ITL_MS, DEFAULT_SLO_TTFT_MS, SimResult, simulate
from sim.router import ROUTERS, make_router

__all__ = ["simulate", "SimResult", "DEFAULT_SLO_TTFT_MS", "DEFAULT_SLO_ITL_MS", "ROUTERS",
           "make_router"]
