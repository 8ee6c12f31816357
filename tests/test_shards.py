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


def _on_a_pool(requests, cm, policy: str, replicas: int):  # type: ignore[no-untyped-def]
    """simulate's two shards as tasks on a local process pool."""
    pool = PoolExecutor(2)
    try:
        return simulate(requests, cm, policy, num_replicas=replicas, workers=2, executor=pool)
    finally:
        pool.close()


def test_shards_on_a_process_pool_give_one_process_results() -> None:
    cm, requests = _cm(), _requests()
    one = simulate(requests, cm, "chunked:512", num_replicas=4)
    forked = simulate(requests, cm, "chunked:512", num_replicas=4, workers=2)
    tasks = _on_a_pool(requests, cm, "chunked:512", 4)
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


def test_a_cost_model_subclass_pickles_as_itself_and_prices_alike_on_a_pool() -> None:
    """A user's CostModel subclass (here a constant 10 ms a step) keeps its class and its own
    attributes through pickling, so shards on a process pool price as the caller's does."""
    from tests.helpers import ConstantCost
    from traces.request import Request

    cm = ConstantCost(0.01)
    back = pickle.loads(pickle.dumps(cm))
    assert type(back) is ConstantCost and back.latency_s == 0.01
    assert back.model == cm.model and back.parallel == cm.parallel
    requests = [Request(i, 0.003 * i, 50 + (37 * i) % 900, 1 + (13 * i) % 200) for i in range(120)]
    forked = simulate(requests, cm, "layered", num_replicas=3, workers=2)
    tasks = _on_a_pool(requests, cm, "layered", 3)
    assert tasks.requests.equals(forked.requests)
    assert tasks.metrics["mean_tpot_ms"] == pytest.approx(10.0)
