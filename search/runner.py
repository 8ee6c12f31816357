"""Running a search: every configuration's bisection, per seed, as probes on an executor.

Each (configuration, seed) is a chain: the rate search of sim.capacity.rate_steps, which
yields the next rate per replica once it is told whether the last one met the target. All
chains advance together: the driver asks each chain for its next rate, looks the probe up in
the store (a finished probe is never run again), and otherwise submits it to the executor;
when any probe finishes, its record is written to the store at once and the chains waiting on
it advance. Two chains that need the same probe (same key) share one task.

A split search (`split_pools`) has one chain per configuration instead: the walk of sim/split.py
at the target rate, which yields (prefill workers, decode workers, seed) for each simulation,
every seed of a split before the next split, and is sent each probe's metrics.

Determinism: a chain's probes depend only on the results of its own earlier probes, and a
probe's result only on its key, so every chain makes the same probes and ends at the same
answer whatever order tasks finish in, on any executor, fresh or resumed from the store.

Requests are built once per distinct workload (the study keys that shape it, WORKLOAD_KEYS,
and the model's context) in the driver and handed to the executor's `share`, so a Ray cluster
holds one copy in its object store for every task that uses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from costmodel.errors import ConfigError
from search.executor import Executor
from search.grid import Config, SearchSpec
from search.probe import (
    ProbeTask,
    cost_model_digest,
    probe_key,
    requests_digest,
    run_probe,
    workload_key,
)
from search.rank import Answer, ProbePoint, SplitAnswer, make_answer, make_split_answer
from search.store import ProbeStore
from sim.capacity import Point, rate_steps
from sim.split import Split, split_probes
from sim.study import Study


@dataclass
class Chain:
    config: int  # index into the configurations
    seed: int  # of the probe waiting (a split chain's changes with each)
    steps: Generator[Any, Any, Any]  # rate_steps, or for a split search split_probes
    rate: float | None = None  # the rate per replica waiting for its probe
    points: list[ProbePoint] = field(default_factory=list)
    done: bool = False
    split: Split | None = None  # a split chain's probe waiting: (prefill, decode) workers
    splits: list[Point] | None = None  # a split chain's splits, each over its seeds
    answer: Split | None = None  # a split chain's cheapest split, once done

    def probe_study(self, study: Study, target_rate: float | None) -> Study:
        """The configuration's study as this chain's waiting probe runs it."""
        if self.split is None:
            assert self.rate is not None
            changes: dict[str, Any] = {"seed": self.seed, "rate": self.rate * study.replicas}
        else:
            changes = {"seed": self.seed, "rate": target_rate, "split_pools": False,
                       "prefill_replicas": self.split[0], "decode_replicas": self.split[1]}
        return Study.model_validate({**study.model_dump(), **changes})

    def advance(self, sent: Any) -> None:
        """Send the last probe's verdict (a rate chain) or metrics (a split chain); None
        starts the chain (a generator's first send)."""
        try:
            step = self.steps.send(sent)
        except StopIteration as stop:
            self.rate, self.split, self.done = None, None, True
            self.answer = stop.value if self.splits is not None else None
            return
        self._take(step)

    def _take(self, step: Any) -> None:
        if self.splits is None:
            self.rate = step
        else:
            prefill, decode, self.seed = step
            self.split, self.rate = (prefill, decode), None


@dataclass(frozen=True)
class Progress:
    """What the driver reports after each probe (search/cli progress bar)."""
    probes_done: int
    probes_run: int  # of them, simulated now (the rest came from the store)
    probes_left_estimate: int
    configs_done: int
    configs: int
    best: Answer | SplitAnswer | None
    elapsed_s: float


@dataclass
class _Workloads:
    """Requests per distinct workload, built once; with their digest and shared handle."""
    executor: Executor
    built: dict[str, tuple[tuple[Any, ...], str, Any]] = field(default_factory=dict)

    def get(self, study: Study, max_context: int) -> tuple[tuple[Any, ...], str, Any]:
        wkey = workload_key(study, max_context)
        if wkey not in self.built:
            requests = tuple(study.build_workload(max_context).requests)
            self.built[wkey] = (requests, requests_digest(requests), self.executor.share(requests))
        return self.built[wkey]


def run_search(configs: list[Config], spec: SearchSpec, base: Study, executor: Executor,
               store: ProbeStore, on_progress: Callable[[Progress], None] | None = None,
               rank_key: Callable[[list[Any]], list[Any]] | None = None,
               ) -> tuple[list[Answer | SplitAnswer], list[ProbePoint]]:
    """The answer of every configuration (in grid order) and every probe the search used."""
    start = time.monotonic()
    seeds = [base.seed + j for j in range(spec.seeds)]
    if base.split_pools:
        assert spec.target_rate is not None  # grid.read_search requires it
        chains = [_split_chain(i, c.study, spec.target_rate, seeds, base.target, spec.confidence)
                  for i, c in enumerate(configs)]
    else:
        chains = [Chain(i, s, rate_steps(base.start_rate, spec.rel_tol, spec.max_probes))
                  for i in range(len(configs)) for s in seeds]
    cost_sha: dict[int, str] = {}
    contexts: dict[int, int] = {}
    for i, c in enumerate(configs):
        cm = c.study.cost_model()
        cost_sha[i], contexts[i] = cost_model_digest(cm), cm.model.max_context
    workloads = _Workloads(executor)
    inflight: dict[str, Any] = {}  # probe key -> executor handle
    waiting: dict[str, list[Chain]] = {}
    answers: dict[int, Answer | SplitAnswer] = {}
    counts = {"done": 0, "run": 0}

    def answer_of(i: int) -> Answer | SplitAnswer:
        c = configs[i]
        cm_study = c.study
        gpus = cm_study.tp * cm_study.ep
        price = spec.price(cm_study.gpu or "h100", base)
        if base.split_pools:
            (chain,) = (ch for ch in chains if ch.config == i)
            assert chain.splits is not None and spec.target_rate is not None
            return make_split_answer(c.label, c.values, gpus, cm_study.decode_worker_gpus(), chain.splits,
                                     chain.answer, len(seeds), price, spec.target_rate)
        points = [ch.points for ch in chains if ch.config == i]
        return make_answer(c.label, c.values, gpus, points, spec.confidence, price,
                           spec.target_rate)

    def report() -> None:
        if on_progress is None:
            return
        left = sum(max(spec.max_probes - len(ch.points), 1) for ch in chains if not ch.done)
        found = [a for a in answers.values() if a.found]
        best = (rank_key(found) if rank_key else found)[:1]
        on_progress(Progress(counts["done"], counts["run"], left, len(answers), len(configs),
                             best[0] if best else None, time.monotonic() - start))

    def feed(chain: Chain, record: dict[str, Any] | None, key: str) -> None:
        """The chain's pending probe finished (record None: it could not run): advance it."""
        metrics = record["metrics"] if record else {}
        meets = bool(record) and (metrics.get("slo_attainment") or 0.0) >= base.target
        if chain.split is None:
            assert chain.rate is not None
            chain.points.append(ProbePoint(configs[chain.config].label, chain.seed, chain.rate,
                                           key, metrics, meets))
            chain.advance(meets)
        else:
            workers = chain.split[0] + chain.split[1]
            assert spec.target_rate is not None
            chain.points.append(ProbePoint(configs[chain.config].label, chain.seed,
                                           spec.target_rate / workers, key, metrics, meets,
                                           chain.split))
            chain.advance(metrics)
        settle(chain)

    def settle(chain: Chain) -> None:
        """The chain's configuration has its answer once all its chains are done."""
        if chain.done and all(ch.done for ch in chains if ch.config == chain.config):
            answers[chain.config] = answer_of(chain.config)

    def start_probe(chain: Chain) -> None:
        """Look the chain's next probe up, or submit it; repeat while the store answers."""
        while not chain.done:
            cfg = configs[chain.config]
            try:
                study = chain.probe_study(cfg.study, spec.target_rate)
                requests, req_sha, shared = workloads.get(study, contexts[chain.config])
            except (ConfigError, ValueError) as e:  # e.g. more requests than a run may draw
                feed(chain, None, f"not run: {str(e).splitlines()[0]}")
                continue
            key = probe_key(study, req_sha, cost_sha[chain.config])
            record = store.get(key)
            if record is None:
                waiting.setdefault(key, []).append(chain)
                if key not in inflight:
                    inflight[key] = executor.submit(run_probe, ProbeTask(key, study, cost_sha[chain.config]),
                                                     shared)
                return
            counts["done"] += 1
            feed(chain, record, key)
            report()

    for chain in chains:
        chain.advance(None)  # its first probe (a walk with none, over its GPU limit, ends here)
        settle(chain)
        start_probe(chain)
    if answers and not counts["done"]:  # configurations that ended with no probe: say so
        report()
    while inflight:
        for handle_key in _finished(executor, inflight):
            record = executor.result(inflight.pop(handle_key))
            store.put(handle_key, record)  # at once: a kill after this loses nothing
            counts["done"] += 1
            counts["run"] += 1
            for chain in waiting.pop(handle_key):
                feed(chain, record, handle_key)
                start_probe(chain)
            report()
    probes = [p for ch in chains for p in ch.points]
    return [answers[i] for i in range(len(configs))], probes


def _split_chain(config: int, study: Study, rate: float, seeds: list[int], target: float,
                 confidence: float) -> Chain:
    splits: list[Point] = []
    walk = split_probes(study.tp * study.ep, study.decode_worker_gpus(), rate, seeds, target,
                        splits, confidence)
    return Chain(config, seeds[0], walk, splits=splits)


def _finished(executor: Executor, inflight: dict[str, Any]) -> list[str]:
    """Keys of finished probes, in submission order (dicts keep it): deterministic handling."""
    handles = list(inflight.values())
    done = {id(h) for h in executor.wait(handles)}
    return [k for k, h in inflight.items() if id(h) in done]
