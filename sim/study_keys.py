"""How a study's keys are checked one by one, and how a mistake names its key.

BOUNDS and NAMES are applied by the Study model's field validators (sim/study.py); KeyProblem is
what its checks across keys raise, so that make_study (sim/study_file.py) names the key at fault
rather than the model; _read_as turns a model or profile name that cannot be read as a file into
the key's mistake.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from costmodel import ConfigError
from sim.cluster import MAX_REPLICAS, MAX_WORKERS
from traces._checks import MAX_TIME_S, MAX_TOKENS, shown
from traces.workload import MAX_REQUESTS


class KeyProblem(ValueError):
    """A check that spans several keys, with the key the message names (see make_study)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# Keys with an upper bound: (bound, what it is and why). The generated-request bound spans
# rate, duration_s and num_requests and is checked in `Study._across_keys`.
BOUNDS: dict[str, tuple[float, str]] = {
    **dict.fromkeys(("duration_s", "stagger_s"), (MAX_TIME_S, "s (about 317 years), the longest "
                                                              "a run may span")),
    "replicas": (MAX_REPLICAS, "replicas (each is simulated and held in memory)"),
    "workers": (MAX_WORKERS, "processes, more than any machine's cores"),
    "max_context": (MAX_TOKENS, "tokens, the most a request may hold"),
    "block_size": (MAX_TOKENS, "tokens, the most a request may hold"),
    "max_concurrency": (MAX_REQUESTS, "clients, one per request a run may generate"),
    "warmup_requests": (MAX_REQUESTS, "requests, the most a run may generate"),
    "max_num_seqs": (MAX_REQUESTS, "requests, the most a run may generate"),
    "seed": (2**63 - 1, "(a 64-bit seed, as numpy and vLLM take)"),
}
# String keys where an empty value means nothing (a typo such as --gpu= must not become h100)
NAMES = ("model", "gpu", "router", "workload", "arrival", "profile", "dtype", "expert_dtype",
         "kv_cache_dtype")


@contextmanager
def _read_as(key: str, name: str | None) -> Iterator[None]:
    """A model or profile name is also a path: one no file can have (too long, a NUL byte) is
    the key's mistake, in one line, not the file system's."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e).split("\n")[0]
        raise ConfigError(f"{key} {shown(name)}: cannot be read ({why})") from None
