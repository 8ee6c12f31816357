"""`layersim simulate` (one policy) and `layersim compare` (several, same arrivals)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli.flags import add_study_flags, study_values
from core.result import SimResult, policy_folder
from costmodel import ConfigError
from sim.results import check_out, results_folder, setup_record, write_provenance
from sim.run import run_study
from sim.study import Study
from sim.study_file import load_study, make_study
from sim.table import format_comparison
from sim.vllm_result import vllm_result, write_vllm_result
from traces import Workload


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("simulate", help="simulate one policy on a workload", allow_abbrev=False,
                       description="Simulate one policy (--policies with one entry).")
    add_study_flags(p)
    p.set_defaults(handler=run, single=True)
    p = sub.add_parser("compare", help="simulate several policies on the same arrivals "
                       "(bare: the default study)", allow_abbrev=False)
    add_study_flags(p)
    p.set_defaults(handler=run, single=False)


def study_from_args(ns: argparse.Namespace) -> Study:
    flags = study_values(ns)
    if ns.study:
        study = load_study(ns.study, **flags)
    else:
        if ns.single and "policies" not in flags:
            flags["policies"] = ["chunked:512"]
        study = make_study(flags)
    if ns.single and len(study.policies) != 1:
        raise ConfigError(f"--policies: layersim {ns.command} takes one policy, got "
                          f"{len(study.policies)} ({', '.join(study.policies)}); compare takes several")
    return study


def run(ns: argparse.Namespace) -> int:
    check_out(ns.out)
    study = study_from_args(ns)
    if ns.save_result is not None:  # checked before the run, not after it
        if ns.save_result.is_dir():
            raise ConfigError(f"--save-result {ns.save_result}: a folder; give a file name")
        if not ns.save_result.parent.is_dir():
            raise ConfigError(f"--save-result {ns.save_result}: folder {ns.save_result.parent} "
                              "does not exist")
    workload, cm, results = run_study(study, progress=not ns.json, check=ns.check)
    if ns.save_result is not None:
        _save_results(ns.save_result, study, results, workload)
    if ns.out is not None:
        setup = setup_record(study, cm)
        with results_folder(ns.out) as folder:
            for r in results:
                r.write(folder, setup)
            write_provenance(folder, study, setup, getattr(ns, "argv", []))
            _write_report(folder)
    if ns.json:
        for r in results:
            print(json.dumps(r.metrics, sort_keys=True))
        return 0
    print(f"{study.setup_line(cm)}")
    print(f"workload: {workload.description}")
    if workload.skipped_zero:
        print(f"skipped {workload.skipped_zero} zero-token rows of the trace")
    print(f"SLO: {study.slo_text()}\n")
    print(format_comparison([r.metrics for r in results]))
    print(f"\n{cm.profile.accuracy_line()}")
    if ns.out is not None:
        print(f"\nwrote {ns.out}/")
    return 0


def _save_results(path: Path, study: Study, results: list[SimResult], workload: Workload) -> None:
    for r in results:
        name = path if len(results) == 1 else path.with_name(
            f"{path.stem}-{policy_folder(r.policy)}{path.suffix or '.json'}")
        write_vllm_result(name, vllm_result(study, r, workload))


def _write_report(out: Path) -> None:
    try:
        from reports import write_report
    except ImportError:
        return
    try:
        write_report(out)
    except Exception as e:  # a report is a bonus; the tables are already safe on disk
        print(f"layersim: warning: report not written: {e}", file=sys.stderr)
