"""Who sends the requests, and when: open-loop arrivals or closed-loop clients.

Open loop (`max_concurrency` None): each request is sent at its own `arrival_s`.

Closed loop, as `vllm bench serve --max-concurrency N` runs it (vllm/benchmarks/serve.py:
`get_request` yields the requests at the rate, each becomes a task that waits on
`asyncio.Semaphore(max_concurrency)` before calling the request function): requests are
generated at their `arrival_s` (all at 0 without a rate, vLLM's default `--request-rate inf`)
and each waits, in order, for one of N slots; a slot frees when its request finishes and the
next request goes out at that moment. So with no rate N clients each send their next request
the moment their previous one finishes, and with a rate that rate is a cap on sending. The time
a request is sent is its arrival in the tables: vLLM's `start_time`, from which it measures TTFT
and E2E latency (the wait for a slot is its separate `client_queue_time`, in no latency here).
A request the simulator rejects (too long) takes its turn and fails at once, freeing its slot,
as a request the server refuses does in vLLM.

Warm-up: the first W requests in sending order are simulated but marked, and left out of every
metric (core/records.py, core/metrics.py); the measured window opens when the first measured
request is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import simpy

from core.records import Recorder
from core.request import RequestState, request_state
from traces.request import Request


def warmup_split(ordered: Sequence[Request], warmup: int) -> tuple[set[int], Request | None]:
    """The ids of the first `warmup` requests in sending order, and the first measured request
    (None when none is warm-up, so nothing opens a window)."""
    if warmup <= 0:
        return set(), None
    return {r.req_id for r in ordered[:warmup]}, ordered[warmup]


class Clients:
    """The sending side of one simulation: `run` is its SimPy process; `release` is called by
    each finished request."""

    def __init__(self, env: simpy.Environment, max_concurrency: int | None, recorder: Recorder,
                 on_rejected: Callable[[], None], first_measured: int | None = None,
                 rejected: frozenset[int] = frozenset(), block_size: int = 16) -> None:
        self.env = env
        self.block_size = block_size  # the replicas' KV block size: a request's block hashes
        self.limit = max_concurrency
        self.recorder = recorder
        self.first_measured = first_measured  # opens the measured window when sent (closed loop)
        self.rejected = rejected  # closed loop: requests that fail at once when their turn comes
        self.on_rejected = on_rejected  # done with such a request: it frees its slot
        self.in_flight = 0
        self._freed = env.event()
        # called when the measured window opens (the first measured request is sent)
        self.on_window_open: Callable[[], None] | None = None

    def release(self) -> None:
        self.in_flight -= 1
        if not self._freed.triggered:
            self._freed.succeed()

    def run(self, requests: Sequence[Request], submit: Callable[[RequestState], None]
            ) -> Generator[simpy.Event, object, None]:
        env = self.env
        for r in requests:
            if r.arrival_s > env.now:
                yield env.timeout(r.arrival_s - env.now)
            if self.limit is None:  # open loop: the request's own arrival time, exactly
                if r.req_id == self.first_measured and self.on_window_open is not None:
                    self.on_window_open()
                submit(request_state(r, self.block_size))
                continue
            while self.in_flight >= self.limit:
                if self._freed.triggered:
                    self._freed = env.event()
                yield self._freed
            now = env.now
            if r.req_id == self.first_measured:
                self.recorder.count_from_s = now
                if self.on_window_open is not None:
                    self.on_window_open()
            state = request_state(r, self.block_size, now)
            self.in_flight += 1
            if r.req_id in self.rejected:
                self.recorder.rejected(state, now)
                self.on_rejected()
                continue
            submit(state)
