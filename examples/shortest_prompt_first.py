"""A user policy: chunked prefill that starts the shortest waiting prompt first.

Run it with:  layersim compare --policies chunked:512,examples/shortest_prompt_first.py:ShortestPromptFirst
"""

from policies import ChunkedPrefill
from policies.state import ReplicaState, RequestState


class ShortestPromptFirst(ChunkedPrefill):
    """Sarathi-style stall-free batching; waiting prompts ordered by length, not arrival."""

    def __init__(self) -> None:
        super().__init__(max_num_batched_tokens=512)
        self.name = "spf-chunked:512"

    def prompt_order(self, state: ReplicaState) -> list[RequestState]:
        return sorted(state.waiting, key=lambda r: (r.num_prompt_tokens, r.arrival_s))
