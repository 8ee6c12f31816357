"""Running a study: every policy it compares, each on the same workload and cost model.

The policies are all made, and their results folders checked, before the first one runs; with
prefill_replicas / decode_replicas the runs are disaggregated (sim/disagg.py), else each is one
`simulate` call.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from core.result import SimResult, policy_folder
from costmodel import ConfigError, CostModel
from policies.registry import make_policy
from sim.cluster import simulate
from sim.study import Study
from traces import Workload


def run_study(study: Study, *, progress: bool = False, check: bool = False,
              cost_model: CostModel | None = None, pool_gaps: bool = True
              ) -> tuple[Workload, CostModel, list[SimResult]]:
    """`cost_model`: the study's own (study.cost_model()), built already by a caller that
    runs many studies of one model and GPU. `pool_gaps=False`: no pooled inter-token gaps
    (simulate's; a disaggregated run keeps them), for a caller that reads none."""
    _check_policies(study)
    if study.split_pools:  # a search of pool sizes, not a run of one
        raise ConfigError("split_pools: capacity and search search the pools' sizes; a run takes "
                          "fixed ones (prefill_replicas and decode_replicas)")
    cm = study.cost_model() if cost_model is None else cost_model
    workload = study.build_workload(cm.model.max_context)
    executor = None
    if study.ray or study.ray_address is not None:  # Ray is optional: loaded only when asked
        from search.executor import make_executor
        executor = make_executor(study.workers, ray=True, ray_address=study.ray_address)
    try:
        return workload, cm, _run_policies(study, cm, workload, progress, check, executor,
                                           pool_gaps)
    finally:
        if executor is not None:
            executor.close()


def _run_policies(study: Study, cm: CostModel, workload: Workload, progress: bool, check: bool,
                  executor: Any, pool_gaps: bool = True) -> list[SimResult]:
    if study.prefill_replicas is not None or study.decode_replicas is not None:
        from sim.disagg import run_disaggregated

        results = run_disaggregated(study, cm, workload.requests, check)
        return [replace(r, metrics={**r.metrics, "clipped_prompts": workload.clipped})
                for r in results]
    results = [simulate(workload.requests, cm, study.policy_factory(spec),
                        num_replicas=study.replicas,
                        router=study.router, seed=study.seed, block_size=study.block_size,
                        gpu_memory_utilization=study.gpu_memory_utilization,
                        slo_ttft_ms=study.slo_ttft_ms, slo_itl_ms=study.slo_itl_ms,
                        slo_tpot_ms=study.slo_tpot_ms, slo_e2el_ms=study.slo_e2el_ms,
                        metric_percentiles=study.metric_percentiles,
                        check=check, progress=progress, workers=study.workers,
                        max_concurrency=study.max_concurrency,
                        warmup_requests=study.warmup(len(workload.requests)),
                        enable_prefix_caching=study.enable_prefix_caching,
                        async_scheduling=study.async_scheduling, executor=executor,
                        pool_gaps=pool_gaps)
               for spec in study.policies]
    # what the workload shortened to fit the model, beside what the simulator rejected
    return [replace(r, metrics={**r.metrics, "clipped_prompts": workload.clipped})
            for r in results]


def _check_policies(study: Study) -> None:
    """Every policy made before the first one runs: its name must be a safe folder name, and
    two specs that make the same policy (chunked and chunked:512) would write one column name
    and one results folder twice."""
    folders: dict[str, str] = {}
    for spec in study.policies:
        name = make_policy(spec, max_num_seqs=study.max_num_seqs).name
        folder = policy_folder(name)
        if folder in folders:
            raise ConfigError(f"policies: '{folders[folder]}' and '{spec}' both make the policy "
                              f"'{name}' (results folder {folder}); list it once, or give "
                              "a policy class a name of its own")
        folders[folder] = spec
