"""Search the deployment space: the cheapest configuration that meets the SLO (issue 16).

grid.py expands a study file's `search:` grid and prunes what cannot run; runner.py bisects each
configuration's capacity per seed on an executor (executor.py: process pool or Ray), one probe
(probe.py) per task, every finished probe kept in a crash-safe store (store.py); rank.py turns
the answers into a ranked table with confidence intervals and pareto.py into Pareto fronts.
No module imports torch; Ray is imported only inside the Ray executor.
"""
