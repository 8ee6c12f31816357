"""A simulation's replica shards as executor tasks (search/executor.py): a local process pool or
Ray give the results of one process, byte for byte; a cost model survives pickling."""

from __future__ import annotations

import importlib.util
import pickle

import pandas as pd
import pytest

from costmodel import CostModel, Parallelism, load_model, resolve_profile
from costmodel.plan import decode_tile
from search.executor import PoolExecutor, RayExecutor
from sim import simulate
from traces import WorkloadSpec, build_workload


def _cm() -> CostModel:
    return CostModel(load_model("qwen3-30b-a3b"), "h100", resolve_profile("h100"), Parallelism(tp=2))


def test_a_cost_model_pickles_to_the_same_prices() -> None:
    cm = _cm()
    again = pickle.loads(pickle.dumps(cm))
    L = cm.model.num_layers
    plan = [decode_tile(i, 300 + 7 * i, L) for i in range(6)] + [(99, 0, 700, 0, L, 0, False)]
    a, b = again.price(plan), cm.price(plan)
    assert a[:-1] == b[:-1] and a.detail[1:] == b.detail[1:]  # detail[0]: the model itself
    assert again.profile == cm.profile and again.parallel == cm.parallel


def _same(one, forked, tasks) -> None:  # type: ignore[no-untyped-def]
    """Tasks give what forked workers give, to the bit; and one process's tables (its sums
    over iterations differ from the shards' sums of sums in the last bits, as with --workers)."""
    pd.testing.assert_frame_equal(tasks.requests, forked.requests)
    pd.testing.assert_frame_equal(tasks.iterations, forked.iterations)
    assert tasks.metrics == forked.metrics
    pd.testing.assert_frame_equal(tasks.requests, one.requests)
    pd.testing.assert_frame_equal(tasks.iterations, one.iterations)
    for key, value in one.metrics.items():
        assert tasks.metrics[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float)
                                      else value), key


def _requests():  # type: ignore[no-untyped-def]
    return build_workload(WorkloadSpec("sharegpt", rate=12.0, num_requests=240, seed=5)).requests


def test_shards_on_a_process_pool_give_one_process_results() -> None:
    cm, requests = _cm(), _requests()
    one = simulate(requests, cm, "chunked:512", num_replicas=4)
    forked = simulate(requests, cm, "chunked:512", num_replicas=4, workers=2)
    pool = PoolExecutor(2)
    try:
        tasks = simulate(requests, cm, "chunked:512", num_replicas=4, workers=2, executor=pool)
    finally:
        pool.close()
    _same(one, forked, tasks)
    assert tasks.requests["replica"].nunique() == 4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="Ray is not installed (pip install 'layersim[ray]')")
def test_shards_on_local_ray_give_one_process_results() -> None:
    cm, requests = _cm(), _requests()
    one = simulate(requests, cm, "layered", num_replicas=4)
    forked = simulate(requests, cm, "layered", num_replicas=4, workers=2)
    ray = RayExecutor(num_cpus=2)
    try:
        tasks = simulate(requests, cm, "layered", num_replicas=4, workers=2, executor=ray)
    finally:
        ray.close()
    _same(one, forked, tasks)


def test_a_cost_model_on_a_custom_gpu_pickles_with_that_gpu() -> None:
    """Rebuilt from what built it: an edited GPUSpec (not a preset) survives, and so its prices."""
    import dataclasses

    from costmodel.gpu import load_gpu
    h100 = load_gpu("h100")
    gpu = dataclasses.replace(h100, name="my-gpu", hbm_bytes=h100.hbm_bytes // 2,
                              peak_flops=h100.peak_flops / 2)
    cm = CostModel(load_model("qwen3-30b-a3b"), gpu, parallel=Parallelism(tp=2))
    again = pickle.loads(pickle.dumps(cm))
    assert again.hw == cm.hw == gpu
    L = cm.model.num_layers
    plan = [decode_tile(i, 300, L) for i in range(4)]
    assert again.price(plan).latency_s == cm.price(plan).latency_s
