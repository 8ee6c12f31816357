"""One `layersim search` from start to end: read, prune, run, rank, print and write.

The command line (cli/search.py) only parses flags into `flags` (study keys), `grid` (the
`search:` keys) and the output options, and calls `run`. The progress bar goes to stderr: the
probes finished (and how many came from the store), the best configuration so far and tqdm's
estimate of the time left, from the probes still possible (each chain's max_probes less those it
made; the estimate falls as bisections end early).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from search.executor import make_executor
from search.grid import expand, read_search
from search.output import format_table, summary, write_results
from search.rank import rank
from search.runner import Progress, run_search
from search.store import ProbeStore, default_root
from sim.results import check_out
from traces.vllm_datasets import check_legacy_seeds


class _Bar:
    """tqdm over probes; total = probes done + probes still possible (shrinks as chains end)."""

    def __init__(self, enabled: bool) -> None:
        self.bar: Any = None
        self.last: Progress | None = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=0, unit="probe", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, p: Progress) -> None:
        self.last = p
        if self.bar is None:
            return
        self.bar.total = p.probes_done + p.probes_left_estimate
        self.bar.n = p.probes_done
        best = p.best
        text = (f"{best.label} ${best.cost:.4f}/Mtok" if best is not None and best.cost is not None
                else best.label if best is not None else "-")
        self.bar.set_postfix_str(f"configs {p.configs_done}/{p.configs}, stored "
                                 f"{p.probes_done - p.probes_run}, best: {text}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(study_path: str | None, flags: dict[str, Any], grid: dict[str, Any], *,
        out: Path | None = None, as_json: bool = False, progress: bool = True,
        command: list[str] | None = None) -> int:
    check_out(out)
    base, spec = read_search(study_path, flags, grid)
    check_legacy_seeds(base.workload, base.seed, spec.seeds)
    configs, pruned = expand(spec, base)
    store = ProbeStore(spec.store if spec.store is not None else default_root())
    if not as_json:
        split = (f", each as the cheapest prefill and decode pools for {spec.target_rate:g} req/s"
                 if base.split_pools else "")
        print(f"search: {len(configs) + len(pruned)} configurations ({len(pruned)} pruned){split}, "
              f"{spec.seeds} seed{'s' if spec.seeds > 1 else ''} each, target attainment "
              f"{base.target:.0%}, SLO {base.slo_text()}")
    executor = make_executor(spec.jobs, spec.ray, spec.ray_address)
    bar = _Bar(progress and not as_json)  # always called: it keeps the last counts
    start = time.monotonic()
    try:
        answers, probes = run_search(configs, spec, base, executor, store, bar, rank)
    except BaseException:
        executor.close(cancel=True)
        raise
    finally:
        bar.close()
    executor.close()
    wall = time.monotonic() - start
    ranked = rank(answers)
    if out is not None:
        write_results(out, ranked, probes, pruned, base, spec, [c.label for c in configs],
                      command or [])
    if as_json:
        print(json.dumps(summary(ranked, pruned, spec, base.split_pools), sort_keys=True,
                         default=str))
    else:
        done, ran = (bar.last.probes_done, bar.last.probes_run) if bar.last else (0, 0)
        print(f"executor: {executor.name}; {done} probes ({ran} simulated, {done - ran} read "
              f"from the store) in {wall:.1f} s")
        print(format_table(ranked, pruned, spec, base.split_pools))
        accuracy: dict[tuple[str | None, str | None], str] = {}  # per GPU type and profile
        for c in configs:
            key = (c.study.gpu, c.study.profile)
            if key not in accuracy:
                prof = c.study.resolved_profile()
                accuracy[key] = f"{prof.gpu}: {prof.accuracy_line()}"
        for line in accuracy.values():
            print(line)
    return 0 if any(a.found for a in ranked) else 1
