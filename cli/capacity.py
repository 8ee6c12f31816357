"""`layersim capacity`: the highest rate per replica within the SLO, or the fewest GPUs for a rate."""

from __future__ import annotations

import argparse
import json

from cli.flags import add_study_flags
from cli.simulate import _write_report, study_from_args
from sim.capacity import Point, max_rate, min_gpus, study_evaluator, with_price
from sim.results import check_out, results_folder, setup_record, write_provenance


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("capacity", help="search the highest rate (or fewest GPUs) meeting the SLO",
                       allow_abbrev=False, description="Size one policy (--policies with one "
                       "entry): without --rate, the highest rate per replica within the SLO; with "
                       "--rate, the fewest GPUs for that total rate.")
    add_study_flags(p, capacity=True)
    p.set_defaults(handler=run, single=True)


def run(ns: argparse.Namespace) -> int:
    check_out(ns.out)
    study = study_from_args(ns)
    given_rate = study.rate
    cm = study.cost_model()
    if not ns.json:
        print(study.setup_line(cm))
        extra = "".join(f", {name} <= {v:g} ms" for name, v in (
            ("TPOT", study.slo_tpot_ms), ("E2E", study.slo_e2el_ms)) if v is not None)
        print(f"policy {study.policies[0]}, workload {study.workload}, SLO: TTFT <= "
              f"{study.slo_ttft_ms:g} ms, P99 ITL <= {study.slo_itl_ms:g} ms{extra}, "
              f"target attainment {study.target:.0%}")
        print(f"{'rate':>9} {'replicas':>9} {'GPUs':>6} {'attain':>8} {'TTFT ms':>9} {'P99 ITL':>8}  verdict")

    def show(p: Point) -> None:
        if ns.json:
            return
        m = p.metrics
        ttft = m["mean_ttft_ms"] or float("nan")
        itl = m["p99_itl_ms"] or float("nan")
        print(f"{p.rate:>9.3f} {p.replicas:>9d} {m['gpus']:>6d} {p.slo_attainment:>8.1%} "
              f"{ttft:>9.0f} {itl:>8.1f}  {'meets' if p.meets else 'misses'}", flush=True)

    evaluate = study_evaluator(study)
    if given_rate is None:
        answer = max_rate(evaluate, study.target, start_rate=study.start_rate, on_point=show)
    else:
        answer = min_gpus(evaluate, given_rate, study.target, on_point=show)
    answer = with_price(answer, study.price_per_gpu_hour)
    result = answer.to_dict()
    if ns.out is not None:
        setup = setup_record(study, cm, policy=study.policies[0], target_attainment=study.target,
                             price_per_gpu_hour=study.price_per_gpu_hour, rate=given_rate)
        with results_folder(ns.out) as folder:
            (folder / "capacity.json").write_text(
                json.dumps({**result, "setup": setup}, indent=2, sort_keys=True) + "\n")
            write_provenance(folder, study, setup, getattr(ns, "argv", []))
            _write_report(folder)
    if ns.json:
        print(json.dumps(result["answer"], sort_keys=True))
        return 0
    a = result["answer"]
    if not a["found"]:
        print("\nno point met the target" + (" (even at the lowest rate tried)" if given_rate is None
                                             else " within the replica limit"))
        return 1
    line = (f"\nanswer: {a['rate_per_replica']:.3f} req/s per replica" if given_rate is None else
            f"\nanswer: {a['gpus']} GPUs ({a['replicas']} replicas) for {a['rate']:g} req/s")
    line += f", attainment {a['slo_attainment']:.1%}, {a['energy_per_token_j']:.4f} J/token"
    if "cost_per_million_tokens" in a:
        line += f", ${a['cost_per_million_tokens']:.3f} per million tokens"
    print(line)
    return 0
