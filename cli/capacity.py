"""`layersim capacity`: the highest rate per replica within the SLO, or the fewest GPUs for a rate."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from cli.flags import add_study_flags, study_values
from cli.simulate import _write_report
from costmodel import ConfigError, CostModel
from search.files import check_confidence, check_seeds, read_with_extras
from sim.capacity import (
    CapacityAnswer,
    Point,
    SeededAnswer,
    max_rate,
    min_gpus,
    over_seeds,
    replace_study,
    study_evaluator,
    with_price,
)
from sim.results import check_out, results_folder, setup_record, write_provenance
from sim.split import MAX_SPLIT_GPUS, cheapest_split, split_evaluator
from sim.study import Study
from traces.vllm_datasets import check_legacy_seeds


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("capacity", help="search the highest rate (or fewest GPUs) meeting the SLO",
                       allow_abbrev=False, description="Size one policy (--policies with one "
                       "entry): without --rate, the highest rate per replica within the SLO; with "
                       "--rate, the fewest GPUs for that total rate.")
    add_study_flags(p, capacity=True)
    p.add_argument("--seeds", type=int, metavar="K", help="run the search on K seeds (seed, "
                   "seed+1, ...: independent arrivals and lengths) and give the answer's mean with "
                   "a Student-t confidence interval over the K per-seed answers; the conservative "
                   "end (lower rate, more replicas) is priced; with --split-pools every split "
                   "tried runs on the K seeds and meets on the lower end of the interval over "
                   "its attainments (study key seeds; default: one seed, no interval)")
    p.add_argument("--confidence", type=float, metavar="LEVEL", help="two-sided level of the "
                   "--seeds interval (study key confidence; default: 0.9)")
    p.set_defaults(handler=run, single=True)


def _study(ns: argparse.Namespace) -> tuple[Study, int | None, float]:
    """The study, the number of seeds (None: not given) and the interval's level."""
    flags = study_values(ns)
    if not ns.study and "policies" not in flags:
        flags["policies"] = ["chunked:512"]
    study, extras = read_with_extras(ns.study, ("seeds", "confidence"), flags)
    if len(study.policies) != 1:
        raise ConfigError(f"--policies: layersim capacity takes one policy, got "
                          f"{len(study.policies)} ({', '.join(study.policies)}); compare takes several")
    if study.max_concurrency is not None:  # the clients, not the rate, would set the load
        at = "--max-concurrency" if "max_concurrency" in flags else f"{ns.study}: key 'max_concurrency'"
        raise ConfigError(f"{at}: capacity sizes for an offered rate, which closed-loop clients "
                          "would cap; leave it out (compare runs a closed loop)")
    seeds = ns.seeds if ns.seeds is not None else extras.get("seeds")
    conf = ns.confidence if ns.confidence is not None else extras.get("confidence", 0.9)
    where = f"{ns.study}: key" if ns.study else "--"
    if seeds is not None:
        seeds = check_seeds(seeds, "--seeds" if ns.seeds is not None else f"{where} 'seeds'")
        check_legacy_seeds(study.workload, study.seed, seeds)
    conf = check_confidence(conf, "--confidence" if ns.confidence is not None
                            else f"{where} 'confidence'")
    return study, seeds, conf


def run(ns: argparse.Namespace) -> int:
    check_out(ns.out)
    study, seeds, confidence = _study(ns)
    given_rate = study.rate
    cm = study.cost_model()
    if study.split_pools:
        _check_split(study, cm, given_rate)
    if not ns.json:
        print(study.setup_line(cm))
        extra = "".join(f", {name} <= {v:g} ms" for name, v in (
            ("TPOT", study.slo_tpot_ms), ("E2E", study.slo_e2el_ms)) if v is not None)
        print(f"policy {study.policies[0]}, workload {study.workload}, SLO: TTFT <= "
              f"{study.slo_ttft_ms:g} ms, P99 ITL <= {study.slo_itl_ms:g} ms"
              f"{' (and the second-token gap)' if study.split_pools else ''}{extra}, "
              f"target attainment {study.target:.0%}")
        if study.split_pools and seeds is not None and seeds > 1:
            print(f"each split on {seeds} seeds: its mean attainment, TTFT and ITL; it meets when "
                  f"the lower end of the {confidence:.0%} Student-t interval over its seeds does")
        print(f"{'rate':>9} {'replicas':>9} {'GPUs':>6} {'attain':>8} {'TTFT ms':>9} {'P99 ITL':>8}  verdict")

    def show(p: Point) -> None:
        if ns.json:
            return
        m = p.metrics
        ttft = m["mean_ttft_ms"] or float("nan")
        itl = m["p99_itl_ms"] or float("nan")
        workers = str(p.replicas) if p.split is None else f"{p.split[0]}P+{p.split[1]}D"
        print(f"{p.rate:>9.3f} {workers:>9} {m['gpus']:>6d} {p.slo_attainment:>8.1%} "
              f"{ttft:>9.0f} {itl:>8.1f}  {'meets' if p.meets else 'misses'}", flush=True)

    if seeds is not None and not study.split_pools:
        return _run_seeds(ns, study, seeds, confidence, show)
    if study.split_pools:
        answer = _split(study, cm, given_rate, seeds or 1, confidence, show)
    elif given_rate is None:
        answer = max_rate(study_evaluator(study), study.target, start_rate=study.start_rate,
                          on_point=show)
    else:
        answer = min_gpus(study_evaluator(study), given_rate, study.target, on_point=show)
    answer = with_price(answer, study.price_per_gpu_hour)
    result = answer.to_dict()
    if ns.out is not None:
        more = {} if seeds is None else {"seeds": seeds, "confidence": confidence}
        setup = setup_record(study, cm, policy=study.policies[0], target_attainment=study.target,
                             price_per_gpu_hour=study.price_per_gpu_hour, rate=given_rate, **more)
        with results_folder(ns.out) as folder:
            (folder / "capacity.json").write_text(
                json.dumps({**result, "setup": setup}, indent=2, sort_keys=True) + "\n")
            write_provenance(folder, study, setup, getattr(ns, "argv", []))
            _write_report(folder)
    a = result["answer"]
    if ns.json:  # the same exit status as the table's
        print(json.dumps(a, sort_keys=True))
        return 0 if a["found"] else 1
    if not a["found"]:
        limit = (f" within {MAX_SPLIT_GPUS} GPUs" if study.split_pools else
                 " (even at the lowest rate tried)" if given_rate is None
                 else " within the replica limit")
        print("\nno point met the target" + limit)
        print(cm.profile.accuracy_line())
        return 1
    if "prefill_replicas" in a:
        line = (f"\nanswer: {a['gpus']} GPUs ({a['prefill_replicas']} prefill + "
                f"{a['decode_replicas']} decode workers) for {a['rate']:g} req/s")
    elif given_rate is None:
        line = f"\nanswer: {a['rate_per_replica']:.3f} req/s per replica"
    else:
        line = f"\nanswer: {a['gpus']} GPUs ({a['replicas']} replicas) for {a['rate']:g} req/s"
    line += f", attainment {a['slo_attainment']:.1%}"
    if "slo_attainment_low" in a:
        line += (f" (mean over {seeds} seeds; lower end of its {confidence:.0%} Student-t interval "
                 f"{a['slo_attainment_low']:.1%})")
    line += f", {a['energy_per_token_j']:.4f} J/token"
    if "cost_per_million_tokens" in a:
        line += f", ${a['cost_per_million_tokens']:.3f} per million tokens"
    print(line)
    print(cm.profile.accuracy_line())
    return 0


def _split(study: Study, cm: CostModel, rate: float | None, seeds: int, confidence: float,
           show: Callable[[Point], None]) -> CapacityAnswer:
    """--split-pools: the cheapest prefill/decode split at the given rate (sim/split.py); with
    --seeds, each split tried on every seed."""
    assert rate is not None
    decode_gpus = _check_split(study, cm, rate)
    return cheapest_split(split_evaluator(study), rate, study.target, cm.parallel.num_gpus,
                          decode_gpus, seeds=[study.seed + j for j in range(seeds)],
                          confidence=confidence, on_point=show)


def _check_split(study: Study, cm: CostModel, rate: float | None) -> int:
    """--split-pools' mistakes, before anything is printed; the GPUs of one decode worker."""
    if rate is None:
        raise ConfigError("--split-pools needs --rate: the split is searched at a total rate")
    if study.prefill_replicas is not None or study.decode_replicas is not None:
        raise ConfigError("--split-pools searches --prefill-replicas and --decode-replicas: "
                          "leave them out")
    if study.replicas != 1:
        raise ConfigError("--split-pools searches the pools' sizes, which replace --replicas: "
                          "leave it out")
    if study.start_rate != Study.model_fields["start_rate"].default:
        raise ConfigError("--start-rate steers the rate search, which --split-pools does not run "
                          "(it sizes the pools at --rate): leave it out")
    decode_gpus = study.decode_worker_gpus()
    if cm.parallel.num_gpus + decode_gpus > MAX_SPLIT_GPUS:
        raise ConfigError(f"--split-pools: one prefill worker ({cm.parallel.num_gpus} GPUs) and one "
                          f"decode worker ({decode_gpus}) are over the search's {MAX_SPLIT_GPUS} GPUs")
    study.decode_cost_model(cm)  # its checks, before anything is printed
    if study.decode_policy is not None:
        from policies.registry import make_policy

        make_policy(study.decode_policy, max_num_seqs=study.max_num_seqs)
    return decode_gpus


def _run_seeds(ns: argparse.Namespace, study: Study, seeds: int, confidence: float,
               show: Callable[[Point], None]) -> int:
    """--seeds K: the same search once per seed, and the interval over them (sim/capacity.py)."""
    given_rate = study.rate

    def search(seed: int) -> CapacityAnswer:
        if not ns.json:
            print(f"seed {seed}")
        evaluate = study_evaluator(replace_study(study, seed=seed))
        if given_rate is None:
            return max_rate(evaluate, study.target, start_rate=study.start_rate, on_point=show)
        return min_gpus(evaluate, given_rate, study.target, on_point=show)

    answer: SeededAnswer = over_seeds(search, [study.seed + j for j in range(seeds)], confidence,
                                      study.price_per_gpu_hour)
    result = answer.to_dict()
    rows = [{"seed": s["seed"], **row} for s in result["per_seed"] for row in s["search"]]
    if ns.out is not None:
        cm = study.cost_model()
        setup = setup_record(study, cm, policy=study.policies[0], target_attainment=study.target,
                             price_per_gpu_hour=study.price_per_gpu_hour, rate=given_rate,
                             seeds=seeds, confidence=confidence)
        with results_folder(ns.out) as folder:
            (folder / "capacity.json").write_text(json.dumps(
                {**result, "search": rows, "setup": setup}, indent=2, sort_keys=True) + "\n")
            write_provenance(folder, study, setup, getattr(ns, "argv", []))
            _write_report(folder)
    a = result["answer"]
    if ns.json:  # the same exit status as the table's
        print(json.dumps(a, sort_keys=True))
        return 0 if a["found"] else 1
    accuracy = study.resolved_profile().accuracy_line()
    if not a["found"]:
        print("\nno seed's search met the target")
        print(accuracy)
        return 1
    print("\n" + answer.answer_line())
    print(accuracy)
    return 0
