"""`layersim simulate` (one policy) and `layersim compare` (several, same arrivals)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sim.results import check_out, results_folder, setup_record, write_provenance
from sim.study import Study, load_study, make_study, run_study
from sim.table import format_comparison


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", nargs="?", help="a YAML study file (flags override its keys)")
    p.add_argument("--model", help="preset name or config.json path (default qwen3-30b-a3b)")
    p.add_argument("--gpu", help="a100 | h100 | h200 | b200 | cpu (default: the profile's, else h100)")
    p.add_argument("--tp", type=int)
    p.add_argument("--ep", type=int)
    p.add_argument("--replicas", type=int)
    p.add_argument("--router", help="round-robin | least-outstanding | jsq-tokens | power-of-two")
    p.add_argument("--workload", help="arxiv-long | sharegpt | arxiv | azure-conv | mooncake | "
                   "fixed:PROMPT:OUTPUT | a trace file")
    p.add_argument("--rate", type=float, help="arrivals per second, drawn by --arrival (default: a "
                   "trace with timestamps replays its own; other workloads 1.3)")
    p.add_argument("--arrival", help="poisson | gamma | fixed")
    p.add_argument("--cv", type=float, help="coefficient of variation of gamma arrivals")
    p.add_argument("--duration", dest="duration_s", type=float, help="seconds of arrivals "
                   "(default: a replayed trace's own span; else 120 unless --num-requests)")
    p.add_argument("--num-requests", type=int)
    p.add_argument("--speed", type=float, help="replay a real trace k times faster")
    p.add_argument("--seed", type=int)
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-itl-ms", type=float)
    p.add_argument("--profile", help="a calibration profile JSON")
    p.add_argument("--routing-skew", type=float)
    _add_dtypes(p)
    p.add_argument("--workers", type=int, help="processes to split the replicas over "
                   "(round-robin router only; results are the same)")
    p.add_argument("--out", type=Path, help="write tables (parquet) and metrics here")
    p.add_argument("--json", action="store_true", help="print one JSON object per policy")
    p.add_argument("--check", action="store_true", help="check every plan's legality (slower)")


def _add_dtypes(p: argparse.ArgumentParser) -> None:
    """The dtype flags (also used by `explain`); values are checked where they are used."""
    p.add_argument("--dtype", help="bf16 | fp8: weights (default: the model's config.json)")
    p.add_argument("--expert-dtype", help="bf16 | fp8 | mxfp4: expert weights (default: the "
                   "checkpoint's expert format, mxfp4 for gpt-oss, else --dtype)")
    p.add_argument("--kv-cache-dtype", help="bf16 | fp8 (default bf16)")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("simulate", help="simulate one policy on a workload")
    _add_common(p)
    p.add_argument("--policy", help="chunked[:BUDGET] | layered[:MAX_G] | prefill-first | "
                   "hybrid | adaptive[:TBT_MS] | file.py:Class | module:Class")
    p.set_defaults(handler=run, single=True)
    p = sub.add_parser("compare", help="simulate several policies on the same arrivals "
                       "(bare: the default study)")
    _add_common(p)
    p.add_argument("--policies", help="comma-separated policies (default chunked:512,layered)")
    p.set_defaults(handler=run, single=False)


_STUDY_KEYS = ("model", "gpu", "tp", "ep", "replicas", "router", "workload", "rate", "arrival", "cv",
               "duration_s", "num_requests", "speed", "seed", "slo_ttft_ms", "slo_itl_ms",
               "profile", "routing_skew", "dtype", "expert_dtype", "kv_cache_dtype", "workers")


def study_from_args(ns: argparse.Namespace) -> Study:
    flags = {k: getattr(ns, k) for k in _STUDY_KEYS if getattr(ns, k, None) is not None}
    pol = ns.policy if ns.single else ns.policies
    if pol is not None:
        flags["policies"] = [pol] if ns.single else pol
    if "num_requests" in flags and "duration_s" not in flags:
        flags["duration_s"] = None  # --num-requests alone caps by count only
    if ns.study:
        return load_study(ns.study, **flags)
    if ns.single and "policies" not in flags:
        flags["policies"] = ["chunked:512"]
    return make_study(flags)


def run(ns: argparse.Namespace) -> int:
    check_out(ns.out)
    study = study_from_args(ns)
    workload, cm, results = run_study(study, progress=not ns.json, check=ns.check)
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
    print(f"SLO: TTFT <= {study.slo_ttft_ms:g} ms and per-request P99 ITL <= {study.slo_itl_ms:g} ms\n")
    print(format_comparison([r.metrics for r in results]))
    if ns.out is not None:
        print(f"\nwrote {ns.out}/")
    return 0


def _write_report(out: Path) -> None:
    try:
        from reports import write_report
    except ImportError:
        return
    try:
        write_report(out)
    except Exception as e:  # a report is a bonus; the tables are already safe on disk
        print(f"layersim: warning: report not written: {e}", file=sys.stderr)
