"""Executors: where probes (or any picklable tasks) run.

One small interface, three implementations: `submit(fn, *args)` returns a handle, `wait(handles)`
returns those of them that are done (at least one), `result(handle)` its value, `share(obj)` a
value to pass as an argument to many tasks. `map_tasks(executor, fn, items)` runs fn over items and
returns the results in the items' order, whatever order they finish in, so a caller's output
does not depend on scheduling; the search itself drives `submit`/`wait` (search/runner.py).

- SerialExecutor (jobs 0): in this process, at submit; for tests and debugging.
- PoolExecutor (the default): a local process pool (forkserver start: workers are forked from
  a clean process with layersim imported once, never from a driver holding threads). Shared
  values are pickled with each task.
- RayExecutor (`--ray`, `--ray-address`): each task a Ray task; a shared value is put into
  Ray's object store once (ray.put) and every task that takes it receives the same object by
  reference. Ray is imported here only, when this executor is made.

The replica shards of one large simulation run on the same interface: `simulate(executor=)`
(sim/cluster.py) submits each shard's picklable arguments, and `map_tasks` returns the shards
in order, ready to merge.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from costmodel.errors import ConfigError


class Executor(Protocol):
    name: str

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any: ...
    def wait(self, handles: list[Any]) -> list[Any]: ...
    def result(self, handle: Any) -> Any: ...
    def share(self, obj: Any) -> Any: ...
    def close(self, cancel: bool = False) -> None: ...


class SerialExecutor:
    name = "this process"

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        fut: cf.Future[Any] = cf.Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # kept for result(), as a pool would
            fut.set_exception(e)
        return fut

    def wait(self, handles: list[Any]) -> list[Any]:
        return list(handles)

    def result(self, handle: Any) -> Any:
        return handle.result()

    def share(self, obj: Any) -> Any:
        return obj

    def close(self, cancel: bool = False) -> None:
        pass


class PoolExecutor(SerialExecutor):
    def __init__(self, jobs: int | None = None) -> None:
        self.jobs = jobs or os.cpu_count() or 1
        self.name = f"local process pool ({self.jobs} processes)"
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["search.probe"])
        self._pool = cf.ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx)

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        return self._pool.submit(fn, *args)

    def wait(self, handles: list[Any]) -> list[Any]:
        done, _ = cf.wait(handles, return_when=cf.FIRST_COMPLETED)
        return [h for h in handles if h in done]  # the caller's order, not completion order

    def close(self, cancel: bool = False) -> None:
        # cancel (an error or Ctrl-C): queued probes are dropped and running ones are not
        # waited for; each worker exits when its probe ends (finished probes are stored already)
        self._pool.shutdown(wait=not cancel, cancel_futures=True)


class RayExecutor:
    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray needs Ray: pip install 'layersim[ray]'") from None
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is not None:
                kwargs["address"] = address
            elif num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except Exception as e:  # Ray's own error types vary by version; one line either way
                where = f"--ray-address {address}" if address is not None else "--ray"
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"{where}: cannot start or reach Ray ({why})") from None
        self.name = f"Ray ({address or 'local instance'})"
        self._remote: dict[Callable[..., Any], Any] = {}

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self._ray.remote(fn)
        return self._remote[fn].remote(*args)  # ObjectRef arguments arrive resolved

    def wait(self, handles: list[Any]) -> list[Any]:
        ready, _ = self._ray.wait(handles, num_returns=1)
        done = set(ready)
        return [h for h in handles if h in done]

    def result(self, handle: Any) -> Any:
        return self._ray.get(handle)

    def share(self, obj: Any) -> Any:
        return self._ray.put(obj)

    def close(self, cancel: bool = False) -> None:
        del cancel  # shutting down a Ray instance this executor started ends its tasks
        if self._started:
            self._ray.shutdown()


def make_executor(jobs: int | None = None, ray: bool = False, ray_address: str | None = None
                  ) -> Executor:
    if ray or ray_address is not None:
        return RayExecutor(ray_address, num_cpus=jobs or None)
    if jobs == 0:
        return SerialExecutor()
    return PoolExecutor(jobs)


def map_tasks(executor: Executor, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]]
        ) -> list[Any]:
    """fn(*item) for each item, on the executor; the results in the items' order."""
    handles = [executor.submit(fn, *item) for item in items]
    return [executor.result(h) for h in handles]
