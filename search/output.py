"""What a search prints and writes: the ranked table, the Pareto fronts, the results folder.

The folder (`--out DIR`, written whole by sim.results.results_folder: INCOMPLETE while written,
COMPLETE last) holds search.parquet (one row per configuration, in rank order), probes.parquet
(every probe the search used, sorted by configuration, seed and order), search.json (the
answers, fronts, pruned configurations with their reasons, and the setup), search.yaml (the
study and grid as resolved), run.json and report.html. Nothing in it depends on where or in
what order probes ran, or on wall-clock time, so the same search writes the same bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from search.grid import Pruned, SearchSpec
from search.pareto import front
from search.rank import ProbePoint, SplitAnswer
from sim.results import layersim_version, results_folder
from sim.split import MAX_SPLIT_GPUS
from sim.study import Study


def fronts(ranked: list[Any]) -> dict[str, list[str]]:
    found = [a for a in ranked if a.found]
    cost = lambda a: a.cost  # noqa: E731
    return {"cost_vs_p99_ttft": [a.label for a in front(found, cost, lambda a: a.row()["p99_ttft_ms"])],
            "cost_vs_energy": [a.label for a in front(found, cost,
                                                      lambda a: a.row()["energy_per_token_j"])]}


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(ranked: list[Any], pruned: list[Pruned], spec: SearchSpec,
                 split: bool = False) -> str:
    """`split`: a split_pools search (its answers are SplitAnswers, if any ran)."""
    width = max([len(a.label) for a in ranked] + [6])
    if split:
        return _split_table(ranked, pruned, spec, width)
    ci = f"{spec.confidence:.0%} CI" if spec.seeds > 1 else "(1 seed)"
    gpus_head = f"GPUs@{spec.target_rate:g}" if spec.target_rate is not None else "GPUs"
    lines = [f"{'rank':>4}  {'config':<{width}}  {'req/s per replica':>17}  {ci:>17}  "
             f"{gpus_head:>9}  {'$/Mtok':>8}  {'J/token':>8}  {'p99 TTFT':>9}"]
    for i, a in enumerate(ranked, 1):
        r = a.row()
        if not a.found:
            lines.append(f"{'-':>4}  {a.label:<{width}}  no rate tried met the target")
            continue
        band = (f"{r['rate_per_replica_low']:.3f}-{r['rate_per_replica_high']:.3f}"
                if spec.seeds > 1 else "")
        lines.append(f"{i:>4}  {a.label:<{width}}  {r['rate_per_replica']:>17.3f}  {band:>17}  "
                     f"{_num(r['gpus'], 'd'):>9}  {_num(r['cost_per_million_tokens'], '.4f'):>8}  "
                     f"{_num(r['energy_per_token_j'], '.4f'):>8}  {_num(r['p99_ttft_ms'], '.0f'):>9}")
    return "\n".join(lines + _tail(ranked, pruned, width))


def _split_table(ranked: list[SplitAnswer], pruned: list[Pruned], spec: SearchSpec,
                 width: int) -> str:
    """A split search's table: each configuration's cheapest split at the target rate."""
    low = f"{spec.confidence:.0%} CI low" if spec.seeds > 1 else ""
    lines = [f"{'rank':>4}  {'config':<{width}}  {'split':>7}  {'attain':>7}  {low:>11}  "
             f"{f'GPUs@{spec.target_rate:g}':>9}  {'$/Mtok':>8}  {'J/token':>8}  {'p99 TTFT':>9}"]
    for i, a in enumerate(ranked, 1):
        r = a.row()
        if not a.found:
            lines.append(f"{'-':>4}  {a.label:<{width}}  no split within {MAX_SPLIT_GPUS} GPUs met "
                         f"the target ({a.splits_tried} tried)")
            continue
        band = f"{r['slo_attainment_low']:.1%}" if spec.seeds > 1 else ""
        split = f"{r['prefill_replicas']}P+{r['decode_replicas']}D"
        lines.append(f"{i:>4}  {a.label:<{width}}  {split:>7}  {r['slo_attainment']:>7.1%}  "
                     f"{band:>11}  {_num(r['gpus'], 'd'):>9}  "
                     f"{_num(r['cost_per_million_tokens'], '.4f'):>8}  "
                     f"{_num(r['energy_per_token_j'], '.4f'):>8}  {_num(r['p99_ttft_ms'], '.0f'):>9}")
    return "\n".join(lines + _tail(ranked, pruned, width))


def _tail(ranked: list[Any], pruned: list[Pruned], width: int) -> list[str]:
    """The pruned configurations and the Pareto fronts, under either table."""
    lines = [f"{'-':>4}  {p.label:<{width}}  pruned: {p.reason}" for p in pruned]
    f = fronts(ranked)
    lines.append("")
    lines.append("Pareto front, cost against p99 TTFT: " + (", ".join(f["cost_vs_p99_ttft"]) or "-"))
    lines.append("Pareto front, cost against energy per token: "
                 + (", ".join(f["cost_vs_energy"]) or "-"))
    return lines


def summary(ranked: list[Any], pruned: list[Pruned], spec: SearchSpec,
            split: bool = False) -> dict[str, Any]:
    method: dict[str, Any] = {"capacity": "per seed: bisection on the rate per replica (sim."
                                          "capacity.rate_steps); over seeds: Student-t interval, "
                                          "ranked and priced at its lower end",
                              "confidence": spec.confidence, "seeds": spec.seeds,
                              "rel_tol": spec.rel_tol, "max_probes": spec.max_probes}
    if split:
        method = {"capacity": "the cheapest prefill/decode split at target_rate (sim.split: the "
                              "staircase walk within a doubling GPU budget); a split meets when "
                              "the lower end of the Student-t interval over its seeds' "
                              "attainments does", "confidence": spec.confidence,
                  "seeds": spec.seeds, "target_rate": spec.target_rate,
                  "max_gpus": MAX_SPLIT_GPUS}
    return {"ranked": [a.row() for a in ranked], "fronts": fronts(ranked),
            "pruned": [{"config": p.label, **p.values, "reason": p.reason} for p in pruned],
            "method": method}


def _probe_rows(probes: list[ProbePoint], order: dict[str, int]) -> list[dict[str, Any]]:
    keyed = [(order[p.config], p.seed, n, p.row()) for n, p in enumerate(probes)]
    return [{"step": n, **row} for _, _, n, row in sorted(keyed, key=lambda t: t[:3])]


def write_results(out: Path, ranked: list[Any], probes: list[ProbePoint], pruned: list[Pruned],
                  base: Study, spec: SearchSpec, grid_order: list[str], command: list[str]) -> None:
    from reports.search import write_search_report

    order = {label: i for i, label in enumerate(grid_order)}
    # a probe's step: its place within its own chain (configuration, seed)
    steps: dict[tuple[str, int], int] = {}
    rows = []
    for row in _probe_rows(probes, order):
        k = (row["config"], row["seed"])
        row["step"] = steps[k] = steps.get(k, -1) + 1
        rows.append(row)
    result = summary(ranked, pruned, spec, base.split_pools)
    setup: dict[str, Any] = {"layersim_version": layersim_version(), "study": base.model_dump(mode="json"),
             "search": spec.model_dump(mode="json", exclude={"jobs", "ray", "ray_address",
                                                             "store"})}
    with results_folder(out) as folder:
        pd.DataFrame([a.row() for a in ranked]).to_parquet(folder / "search.parquet", index=False)
        pd.DataFrame(rows).to_parquet(folder / "probes.parquet", index=False)
        (folder / "search.json").write_text(
            json.dumps({**result, "setup": setup}, indent=2, sort_keys=True, default=str) + "\n")
        (folder / "search.yaml").write_text(
            "# the search as resolved: layersim search search.yaml\n"
            + yaml.safe_dump({**setup["study"], "search": setup["search"]}, sort_keys=False))
        (folder / "run.json").write_text(json.dumps(
            {"layersim_version": setup["layersim_version"], "command": ["layersim", *command],
             "setup": setup}, indent=2, sort_keys=True) + "\n")
        write_search_report(folder)
