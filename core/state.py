"""A replica's state as policies see it, and the one place executors change it.

Progress: a tile (t0, t1, l0, l1) is legal when every layer in [l0, l1) of its request stands
at t0 and layer l0 - 1 (if any) has reached t1; applying it lifts those layers to t1 (see
core/request.py for the staircase). Chunked prefill moves every layer at once, layered prefill
one layer group at a time, hybrids any rectangle. When the last layer reaches every known token
(the prompt's end, or a decode's one new token) the LM head produced the next one: the request
emits it, and finishes with its last. `apply` does this for one plan, `apply_steady` for K
identical decode iterations in closed form; `check` proves a plan legal beforehand (core/legality.py).

Memory: a `core.blocks.BlockPool` of `num_total_blocks` blocks of `block_size` tokens; each
request's `BlockTable` holds KV blocks for every token any layer has computed, plus, while a
prompt is part-way through the stack, anonymous blocks for its hidden states at the layer
frontier (layered prefill's memory cost). `apply` admits the plan's new requests (taking their
prefix hits) before it grows any table, then grows them in plan order; once tokens are through
every layer their full blocks are offered to the prefix cache (`mark_computed`); finishing and
preemption free the table. Policies price admissions with `admission()` (a `core.admission.
Admission` that has reserved the running decodes' next blocks): no policy does block arithmetic.

Prefix caching (vLLM's automatic prefix caching, on unless `enable_prefix_caching` is False):
a waiting request's prefix is matched each time the scheduler considers it (`match_waiting`,
called by core.step.prepare before every schedule call) and its `num_computed_tokens` set to
the hit, so every policy starts its first tile at the first uncached token and `check` holds it
to that. The hit is taken (references on the cached blocks) when `apply` admits it; nothing
changes the pool between the match and the admission, so they agree (an internal PlanError if
not). A request with no known content (no block hashes: synthetic lengths) never hits.

Preemption is vLLM's recompute: the newest running request frees its KV and goes back to the
head of the waiting queue to redo its prefill, its output so far folded into the prompt.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING

from core import growth, preemption
from core.admission import Admission
from core.blocks import (
    BlockPool,
    NoFreeBlocksError,
    blocks_needed,
    hidden_state_blocks,
    peak_blocks,
)
from core.legality import PlanError, check_plan
from core.request import RequestState
from costmodel.plan import Tile

if TYPE_CHECKING:
    from costmodel.price import CostModel


@dataclass
class ReplicaState:
    """What a policy sees: requests waiting and running, KV memory, the clock and a cost model."""

    num_layers: int
    num_total_blocks: int
    block_size: int = 16
    hidden_blocks_per_token: float = 0.0  # blocks one token's hidden state takes at a frontier
    cost_model: CostModel | None = None
    now_s: float = 0.0
    waiting: list[RequestState] = field(default_factory=list)  # arrived, no KV yet, FCFS
    running: list[RequestState] = field(default_factory=list)  # admitted, in admission order
    num_preemptions: int = 0
    # preemptions in a row that undid no new work while no token was emitted: a livelock grows it
    futile_preemptions: int = 0
    # The last `apply`'s final prompt tokens run as 1-token whole-stack tiles with logits: the
    # cost model prices such a tile as a decode (the same work), so an iteration row moves
    # them from its decode to its prefill columns (core.records.Recorder.iteration_row).
    prompt_tokens_as_decodes: int = field(default=0, init=False, repr=False)
    enable_prefix_caching: bool = True
    # P/D disaggregation (core/handoff.py): a prefill worker keeps a finished request's KV until
    # its transfer ends; a decode worker holds blocks for a request whose KV is on its way.
    # Both hold blocks outside `waiting` and `running`.
    keep_finished_kv: bool = False
    # a prefill worker's KV in transit waits for decode blocks that its own part-way streaming
    # prompts may hold: preempt such a prompt rather than wait (set at each planning point)
    transit_may_wait_on_streams: bool = False
    in_transit: list[RequestState] = field(default_factory=list)
    # Tokens still to compute through the whole stack, summed over the requests held here
    # (waiting or running, each prompt + max_tokens - 1 - num_computed_tokens): the jsq-tokens
    # router's load, kept as a running sum at every change below (recount_pending_tokens checks it)
    pending_tokens: int = field(default=0, init=False)
    pool: BlockPool = field(init=False, repr=False)
    _decodes: list[RequestState] | None = field(default=None, init=False, repr=False)
    _by_id: dict[int, RequestState] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.pool = BlockPool(self.num_total_blocks, self.block_size, self.enable_prefix_caching)
        self.prompt_tokens_as_decodes = 0  # instance attributes from the start (policies.base)
        self.pending_tokens = 0

    def enqueue(self, req: RequestState) -> None:
        """An arrival joins the waiting queue."""
        self.waiting.append(req)
        self.pending_tokens += req.tokens_to_go

    def recount_pending_tokens(self) -> int:
        """`pending_tokens` counted afresh (checked mode compares the two)."""
        return sum(r.tokens_to_go for reqs in (self.waiting, self.running) for r in reqs)

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn prefix caching on or off before the replica serves anything."""
        if self.pool.num_used_blocks or self.pool.stats().num_queries:
            raise ValueError("prefix caching can only be set before the replica holds KV blocks")
        self.enable_prefix_caching = self.pool.enable_prefix_caching = enabled

    # ---- memory: the pool (policies read num_free_blocks and use admission()) ----------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can still take: free ones and cached ones nobody holds."""
        p = self.pool  # BlockPool.num_free_blocks, inlined: read on every schedule call
        return len(p._free) + p.num_blocks - p._num_fresh + len(p._evictable)

    def admission(self) -> Admission:
        """A schedule call's admission helper, the running decodes' next blocks reserved:
        `try_admit(req, num_tokens, partial=False)` reserves a request's blocks for
        `num_tokens` (prefix hits and hidden states included) if they fit. The decodes' blocks
        are counted only where an admission comes close (Admission's note)."""
        return Admission(self.pool, (), self.hidden_blocks_per_token, 0, self.decodes)

    def blocks_for(self, num_tokens: int, partial: bool = False) -> int:
        """Blocks a request holds with `num_tokens` in its KV cache (plus hidden states if partial)."""
        return blocks_needed(num_tokens, self.block_size,
                             self.hidden_blocks_per_token if partial else 0.0)

    def peak_blocks(self, num_prompt_tokens: int, max_tokens: int) -> int:
        """The most blocks a request ever holds: hidden states part-way through the prompt, or
        the whole KV cache at its last token."""
        return peak_blocks(num_prompt_tokens, max_tokens, self.block_size,
                           self.hidden_blocks_per_token)

    def can_admit(self, req: RequestState, num_tokens: int, partial: bool = False,
                  reserved: int = 0) -> bool:
        """Whether `req` can hold `num_tokens` with `reserved` blocks set aside (kept for user
        policies; `admission()` does the bookkeeping for a whole plan)."""
        return (Admission(self.pool, (), self.hidden_blocks_per_token).cost(req, num_tokens, partial)
                + reserved <= self.num_free_blocks)

    def decode_growth(self, requests: Sequence[RequestState], steps: int = 1) -> int:
        """Blocks `requests` take to decode `steps` more tokens each (core/growth.py)."""
        return growth.decode_growth(requests, steps, self.block_size)

    def decode_steps_that_fit(self, requests: Sequence[RequestState], most: int) -> int:
        """The largest j <= `most` such that every one of `requests` can decode j more tokens in
        the free blocks (core/growth.py)."""
        return growth.decode_steps_that_fit(requests, most, self.block_size, self.num_free_blocks)

    def _grow(self, requests: Iterable[RequestState]) -> None:
        """_hold each request in turn; inlined for the common case (every decode, every step):
        a whole-stack request whose KV blocks already have room for its tokens and that has no
        block newly full to offer the cache, whose table only records the tokens."""
        bs = self.block_size
        for req in requests:
            table = req.block_table
            c = req.num_computed_tokens
            if req.layer_tokens is None and c <= len(table.block_ids) * bs and not (
                    table.extra_block_ids or table.num_cached_tokens < 0
                    or (table.num_hashed < len(table.block_hashes)
                        and c // bs > table.num_hashed)):
                if c > table.num_tokens:
                    table.num_tokens = c
            else:
                self._hold(req)

    def _hold(self, req: RequestState) -> None:
        """Give `req` the blocks its progress needs now (a PlanError if they are not free), and
        offer its newly full blocks through every layer to the prefix cache."""
        lt = req.layer_tokens
        table = req.block_table
        if lt is None:
            top, extra = req.num_computed_tokens, 0
        else:
            top = lt[0]
            extra = hidden_state_blocks(top, self.hidden_blocks_per_token)
        try:
            self.pool.allocate(table, top, extra)
        except NoFreeBlocksError as e:
            raise PlanError(f"plan needs more KV blocks for request {req.req_id}: {e}") from None
        if table.num_hashed < len(table.block_hashes):
            self.pool.mark_computed(table, req.num_computed_tokens)

    def _admit(self, req: RequestState) -> None:
        """Take the waiting request's prefix hit: it must be where its tiles started."""
        hit = self.pool.admit(req.block_table)
        if hit != req.num_computed_tokens:
            raise PlanError(f"internal: request {req.req_id} was scheduled from token "
                            f"{req.num_computed_tokens} but its cached prefix is {hit} tokens "
                            "(a plan made without core.step.prepare's match_waiting?)")

    def _release(self, req: RequestState) -> None:
        self.pool.free(req.block_table)

    def match_waiting(self) -> None:
        """Set every waiting request's `num_computed_tokens` to its prefix-cache hit now (see
        the module note). Nothing to do until some block was cached: no request can hit."""
        pool = self.pool
        if not pool.ever_cached:
            return
        for r in self.waiting:
            if r.block_table.block_hashes:
                hit = pool.match_prefix(r.block_table)
                self.pending_tokens -= hit - r.num_computed_tokens
                r.num_computed_tokens = hit

    def memory_error(self) -> str | None:
        """What is wrong with the block accounting, if anything: the references the requests'
        tables hold must be the pool's, and free blocks within [0, total]."""
        held = sum(r.num_blocks for r in (*self.running, *self.waiting, *self.in_transit))
        free = self.num_free_blocks
        if 0 <= free <= self.num_total_blocks and held == self.pool.num_refs and (
                self.pool.num_used_blocks <= held):
            return None
        return (f"KV blocks not conserved (tables hold {held} references, the pool counts "
                f"{self.pool.num_refs}; free {free}, total {self.num_total_blocks})")

    # ---- what policies read -------------------------------------------------------------------
    @property
    def decodes(self) -> list[RequestState]:
        """Running requests whose prompt is done: each owes one decode step per iteration.

        Cached between changes (policies and executors ask several times per iteration);
        `apply` and preemption drop the cache, and an executor that changes requests any other
        way must call `changed()`. Treat the list as read-only."""
        if self._decodes is None:
            # is_prefill_done and not is_finished, inlined: this runs every iteration
            self._decodes = [r for r in self.running if r.layer_tokens is None
                             and r.num_computed_tokens >= r.num_prompt_tokens
                             and r.num_output_tokens < r.max_tokens]
        return self._decodes

    @property
    def prompts(self) -> list[RequestState]:
        """Running requests whose prompt is not through the stack yet, in admission order.
        Found from the newest back (they were admitted last, mostly): O(1) beside many decodes."""
        left = len(self.running) - len(self.decodes)
        out: list[RequestState] = []
        if left:
            for r in reversed(self.running):
                if r.layer_tokens is not None or r.num_computed_tokens < r.num_prompt_tokens:
                    out.append(r)
                    if len(out) == left:
                        break
            out.reverse()
        return out

    def changed(self) -> None:
        """Drop the caches (`decodes`, `running_by_id`): the requests changed some other way
        than `apply` (preemption, a request joining `running`), or a policy may have edited
        what they hand out."""
        self._decodes = None
        self._by_id = {}

    @property
    def running_by_id(self) -> dict[int, RequestState]:
        """`running` by req_id, kept as requests join and leave (read-only). Rebuilt where its
        size says `running` changed some other way, or after `changed()`."""
        by_id = self._by_id
        if len(by_id) != len(self.running):
            by_id = self._by_id = {r.req_id: r for r in self.running}
        return by_id

    # ---- executors call these ----------------------------------------------------------------
    def check(self, plan: Sequence[Tile], stall_free: bool) -> tuple[Tile, ...]:
        """Raise PlanError unless `plan` is legal from here (core/legality.py); the plan as
        plain Tiles."""
        return check_plan(self, plan, stall_free)

    def apply(self, plan: Sequence[Tile], now_s: float,
              emitted: list[RequestState] | None = None,
              decodes: Sequence[RequestState] = ()) -> list[RequestState]:
        """Advance every tile's request; emit tokens at `now_s` (appending each request that
        emitted to `emitted`, when given); return the requests that finished, KV freed.

        Only the requests the tiles name are read, found by id now: a request is admitted from
        wherever it stands in the waiting queue. `decodes`: whole-stack decodes run as if their
        decode tiles led the plan, in that order (the fast-forward's way: no tile per decode)."""
        L = self.num_layers
        finished: list[RequestState] = []
        running = self.running_by_id
        touched: dict[int, RequestState] = {}
        as_decodes = 0
        pending = 0  # tokens through the whole stack that the plan adds
        for rid, t0, t1, l0, l1, _cached, logits in plan:
            req = touched.get(rid)
            if req is None:
                req = running.get(rid)
                if req is None:  # admitted now; found near the head of a FCFS queue
                    req = next(r for r in self.waiting if r.req_id == rid)
                    self.waiting.remove(req)
                    self.running.append(req)
                    running[rid] = req
                    req.admitted_s = now_s
                    self._admit(req)
                touched[rid] = req
            if l0 == 0 and l1 == L:
                if t1 - t0 == 1 and logits and t0 < req.num_prompt_tokens:
                    as_decodes += 1  # a prompt's last token alone with logits: priced as a decode
                if req.layer_tokens is None:  # every decode, every chunk
                    pending += t1 - req.num_computed_tokens
                    req.num_computed_tokens = t1
                    continue
            lt = req.layer_tokens
            if lt is None:
                lt = req.layer_tokens = [req.num_computed_tokens] * L
            for l in range(l0, l1):
                lt[l] = t1
            low = lt[L - 1]
            if lt[0] == low:
                req.layer_tokens = None
            pending += low - req.num_computed_tokens
            req.num_computed_tokens = low
        for req in decodes:
            req.num_computed_tokens += 1
        self.pending_tokens -= pending + len(decodes)
        self._grow(decodes)
        self._grow(touched.values())
        for req in chain(decodes, touched.values()) if decodes else touched.values():
            if req.layer_tokens is not None:
                continue
            c = req.num_computed_tokens
            out = req.num_output_tokens
            if c != req.num_prompt_tokens + out:
                continue
            # Every known token (prompt and outputs so far) is through the stack: the LM head
            # produced the next one.
            self.futile_preemptions = 0
            if req.first_token_s is None:
                req.first_token_s = now_s
            else:
                req.itl_s.append(now_s - (req.last_token_s or now_s))
            req.last_token_s = now_s
            out = req.num_output_tokens = out + 1
            if emitted is not None:
                emitted.append(req)
            if out >= req.max_tokens:  # is_finished
                req.finish_s = now_s
                finished.append(req)
        self._retire(finished)
        self.now_s = now_s
        self._decodes = None
        self.prompt_tokens_as_decodes = as_decodes
        return finished

    def apply_steady(self, steps: int, first_end_s: float, gaps: bytes, end_s: float,
                     decodes: Sequence[RequestState] | None = None) -> list[RequestState]:
        """`steps` decode iterations of `decodes` (default: every running request, all
        decoding), in closed form: each emits `steps` tokens, the first at `first_end_s`, the
        last at `end_s`, the gaps between them `gaps` (steps - 1 float64s, the same for every
        request). Returns the requests that finished (at `end_s`), KV freed. As many `apply`s of
        one decode tile per request would do, at the cost of one."""
        running = self.running if decodes is None else decodes
        if decodes is None and len(self.decodes) != len(running):
            raise PlanError("internal: a steady stretch with a prompt still running")
        if running:
            self.futile_preemptions = 0  # tokens emitted: progress
        self.pending_tokens -= steps * len(running)
        finished = []
        # the decodes mostly emitted their last token together: their gaps are then one string
        last_s = running[0].last_token_s if running else None
        shared = array("d", (first_end_s - (last_s or first_end_s),)).tobytes() + gaps
        for r in running:
            if r.last_token_s == last_s:
                r.itl_s.frombytes(shared)
            else:
                itl = r.itl_s
                itl.append(first_end_s - (r.last_token_s or first_end_s))  # as apply does
                itl.frombytes(gaps)
            r.last_token_s = end_s
            r.num_output_tokens += steps
            r.num_computed_tokens += steps
            if r.num_output_tokens >= r.max_tokens:  # is_finished, inlined
                r.finish_s = end_s
                finished.append(r)
        self._grow(running)
        self._retire(finished)
        self.now_s = end_s
        self._decodes = None
        return finished

    def _retire(self, finished: list[RequestState]) -> None:
        for req in finished:
            self.running.remove(req)
            self._by_id.pop(req.req_id, None)
            if self.keep_finished_kv:  # its transfer frees it (core/handoff.py)
                self.in_transit.append(req)
            else:
                self._release(req)
            self.pending_tokens -= req.tokens_to_go

    # ---- preemption (core/preemption.py) -----------------------------------------------------
    def preempt_for_decodes(self) -> list[RequestState]:
        """Recompute-preempt the newest running requests until every decode has its next block.
        Returns the victims."""
        return preemption.preempt_for_decodes(self)

    def preempt_newest(self) -> RequestState:
        """Free the newest running request's KV; it redoes its prefill from the waiting head."""
        return preemption.preempt_newest(self)
