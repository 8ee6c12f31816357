"""Search the deployment space: the cheapest configuration that meets the SLO (issue 16).

grid.py expands a study file's `search:` grid and prunes what cannot run (files.py reads study
files with keys beyond the Study model's); runner.py bisects each configuration's capacity per
seed on an executor (executor.py: serial, process pool or Ray), one probe (probe.py) per task,
every finished probe kept at once in a crash-safe store (store.py); rank.py turns the probes
into answers with confidence intervals and ranks them, pareto.py finds the fronts, output.py
prints and writes the results, session.py runs one search end to end for cli/search.py.
No module imports torch; Ray is imported only inside the Ray executor.
"""
