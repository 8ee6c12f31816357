"""The engine: executes one plan of tiles on a real (random-weight) MoE transformer.

Layer-major execution. For each layer l, the tiles covering l form the layer's batch (single-
token tiles first). A tile's input enters at its first layer l0: the embedding of its tokens
when l0 == 0, otherwise the hidden states of tokens [t0, t1) after layer l0 - 1, kept from an
earlier tile (of this plan or of an earlier iteration). The batch's rows are concatenated: the
projections, the router and the experts run on all of them at once, so decodes and prefill
work share expert loads as on a real server; attention is per tile over that tile's own
request context (engine/attention.py). When a tile leaves the stack before the last layer its
output is kept for the next tile of that request (layered prefill's frontier); when it reaches
the last layer with `logits` set, its last token goes through the final norm and the LM head
and the greedy argmax becomes the request's next token. Distinct experts touched per layer are
counted from the router's choices, so measured expert traffic is that count times the bytes
of one expert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from costmodel.model import ModelSpec
from costmodel.plan import Tile
from engine.attention import attend, probe_attention
from engine.kvcache import PAGE_SIZE, ActiveTile, BatchMeta, PagedKV, batch_meta
from engine.layers import Mlp, Rotary, apply_rotary, rms_norm
from engine.weights import ModelWeights, init_weights


class EngineError(RuntimeError):
    """The engine cannot execute a plan (unknown request, missing hidden state)."""


@dataclass
class Piece:
    """Hidden states of tokens [t0, t1) of one request, waiting to enter layer `layer`."""
    t0: int
    t1: int
    layer: int
    h: torch.Tensor  # [t1 - t0, H]


@dataclass
class StepOutput:
    tokens: dict[int, int]  # request -> token sampled this iteration
    experts_touched: list[int]  # per layer: distinct experts the router chose (0 where idle)
    logits: dict[int, torch.Tensor] | None = None  # request -> [V] fp32, when asked for


class Engine:
    """A model and its KV cache (engine/kvcache.py). Served, a plan's page tables are the replica
    state's block tables (`execute(plan, block_tables=...)`, after core.step.reserve) and the
    cache is laid out in the pool's block size (`use_block_size`)."""

    def __init__(self, spec: ModelSpec, device: str | torch.device = "cpu", *,
                 dtype: torch.dtype | None = None, seed: int = 0, kv_tokens: int = 1 << 16,
                 attention: str = "auto", experts: str = "auto",
                 weights: ModelWeights | None = None, routing_skew: float = 0.0) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed
        self.w = (weights if weights is not None
                  else init_weights(spec, self.device, dtype, seed, routing_skew))
        self.dtype = self.w.dtype
        self.mlp = Mlp(self.w, experts)
        self.attn_impl = (probe_attention(self.device, self.dtype, spec.num_kv_heads,
                                          spec.num_q_heads, spec.head_dim)
                          if attention == "auto" else attention)
        self.rotary = Rotary(spec.head_dim, spec.rope_theta, self.device, self.dtype)
        pages = max(2, -(-kv_tokens // PAGE_SIZE))
        self.kv = PagedKV(spec.num_layers, pages, spec.num_kv_heads, spec.head_dim, self.device,
                          self.dtype)
        self.tokens: dict[int, list[int]] = {}
        # tokens each request id sent through the embedding (computed, not read from cached KV):
        # a count kept after release, for reports and tests
        self.embedded: dict[int, int] = {}
        self.pieces: dict[int, list[Piece]] = {}
        self.windows = [spec.sliding_window if s else 0 for s in spec.sliding_layers]

    @property
    def expert_impl(self) -> str:
        return self.mlp.impl

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, req_id: int, prompt_len: int,
                    token_ids: Sequence[int] | None = None) -> list[int]:
        """Register a request with prompt `token_ids`, or a random prompt drawn from
        (seed, req_id); returns its ids."""
        if token_ids is not None:
            if len(token_ids) != prompt_len:
                raise EngineError(f"request {req_id}: {len(token_ids)} token ids for a "
                                  f"{prompt_len}-token prompt")
            ids = [int(t) for t in token_ids]
        else:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + req_id + 1)
            ids = torch.randint(0, self.spec.vocab, (prompt_len,), generator=gen).tolist()
        self.tokens[req_id] = ids
        return ids

    def use_block_size(self, block_size: int) -> int:
        """Lay the KV cache out in pages of `block_size` tokens (the replica's KV block size),
        with no request holding pages; returns how many such pages (blocks) it holds.

        FlashAttention's paged kernels ('varlen') need a multiple of 256: for another size the
        engine falls back to SDPA, which takes any page size (engine/attention.py)."""
        if self.attn_impl == "varlen" and block_size % 256:
            self.attn_impl = "sdpa"
        self.kv.repage(block_size)
        return self.kv.num_pages

    def release(self, req_id: int, keep_tokens: bool = False) -> None:
        """Drop a request's hidden states and the pages it took from the cache's own free list
        (served, its pages are pool blocks, which the core frees); keep its token ids on a
        preemption."""
        self.kv.release(req_id)
        self.pieces.pop(req_id, None)
        if not keep_tokens:
            self.tokens.pop(req_id, None)

    def fake_context(self, req_id: int, num_tokens: int) -> None:
        """Pretend `num_tokens` are cached (KV pages taken, contents left as they are) and one
        more token is due for decoding: for timing decodes at long contexts without running
        their prefill."""
        if req_id not in self.tokens:
            self.add_request(req_id, num_tokens + 1)
        self.kv.ensure(req_id, num_tokens + 1)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- execution --------------------------------------------------------------------------
    def execute(self, plan: Sequence[Tile], return_logits: bool = False,
                block_tables: Mapping[int, Sequence[int]] | None = None) -> StepOutput:
        """Run `plan`. With `block_tables` (req_id -> KV block ids in token order, covering each
        tile's tokens) those are the requests' pages, as the replica's pool allocated them;
        without, the cache's own free list gives pages."""
        L = self.spec.num_layers
        tiles = list(plan)
        if not tiles:
            return StepOutput({}, [0] * L)
        P, num_pages = self.kv.page_size, self.kv.num_pages
        for t in tiles:
            if t.req_id not in self.tokens:
                raise EngineError(f"tile for request {t.req_id}, which the engine does not know")
            if block_tables is None:
                self.kv.ensure(t.req_id, t.t1)
                continue
            pages = block_tables.get(t.req_id)
            if pages is None or len(pages) * P < t.t1:
                raise EngineError(f"request {t.req_id}: its block table does not cover tokens "
                                  f"[0, {t.t1}) in blocks of {P}")
            if max(pages[:-(-t.t1 // P)], default=0) >= num_pages:
                raise EngineError(f"request {t.req_id}: block id {max(pages)} outside the "
                                  f"engine's {num_pages} KV pages")
        order = sorted(range(len(tiles)), key=lambda i: tiles[i].t1 - tiles[i].t0 != 1)
        hidden: list[torch.Tensor | None] = [None] * len(tiles)
        metas: dict[tuple[int, ...], tuple[BatchMeta, torch.Tensor, torch.Tensor]] = {}
        counts: list[torch.Tensor | int] = [0] * L
        last: list[tuple[int, torch.Tensor]] = []
        for layer in range(min(t.l0 for t in tiles), max(t.l1 for t in tiles)):
            active = tuple(i for i in order if tiles[i].l0 <= layer < tiles[i].l1)
            if not active:
                continue
            for i in active:
                if tiles[i].l0 == layer:
                    hidden[i] = self._input(tiles[i])
            if active not in metas:
                meta = batch_meta([ActiveTile(tiles[i].req_id, tiles[i].t0, tiles[i].t1)
                                   for i in active], self.kv, self.device, block_tables)
                cos, sin = self.rotary.tables(meta.positions, meta.max_pos)
                metas[active] = (meta, cos, sin)
            parts = [h for h in (hidden[i] for i in active) if h is not None]
            x = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, H]
            x, counts[layer] = self._layer(layer, x, *metas[active])
            for i, h in zip(active, x.split([tiles[i].t1 - tiles[i].t0 for i in active]), strict=True):
                t = tiles[i]
                if t.l1 == layer + 1:
                    hidden[i] = None
                    if layer + 1 < L:
                        self.pieces.setdefault(t.req_id, []).append(Piece(t.t0, t.t1, layer + 1, h))
                    elif t.logits:
                        last.append((i, h[-1]))
                else:
                    hidden[i] = h
        out = StepOutput({}, self._counts(counts))
        if last:
            hs = torch.stack([h for _, h in last])  # [N, H]
            logits = F.linear(rms_norm(hs, self.w.final_norm, self.spec.rms_norm_eps),
                              self.w.lm_head).float()  # [N, V]
            ids = torch.argmax(logits, dim=-1).tolist()
            for (i, _), tok, row in zip(last, ids, logits, strict=True):
                t = tiles[i]
                toks = self.tokens[t.req_id]
                if len(toks) == t.t1:  # the next token is new (not one a recompute already has)
                    toks.append(int(tok))
                out.tokens[t.req_id] = int(tok)
                if return_logits:
                    out.logits = out.logits or {}
                    out.logits[t.req_id] = row
        self.sync()
        return out

    def _counts(self, counts: list[torch.Tensor | int]) -> list[int]:
        dev = [c for c in counts if isinstance(c, torch.Tensor)]
        values = iter(torch.stack(dev).tolist() if dev else [])  # one sync for every layer
        return [int(next(values)) if isinstance(c, torch.Tensor) else 0 for c in counts]

    def _input(self, t: Tile) -> torch.Tensor:
        """Hidden states entering layer t.l0 for tokens [t.t0, t.t1): [n, H]."""
        if t.l0 == 0:
            ids = torch.tensor(self.tokens[t.req_id][t.t0:t.t1], device=self.device)  # [n]
            if len(ids) != t.t1 - t.t0:
                raise EngineError(f"request {t.req_id}: tokens [{t.t0}, {t.t1}) not known yet")
            self.embedded[t.req_id] = self.embedded.get(t.req_id, 0) + len(ids)
            return self.w.embed[ids]  # [n, H]
        return self._take(t.req_id, t.t0, t.t1, t.l0)

    def _take(self, rid: int, t0: int, t1: int, layer: int) -> torch.Tensor:
        """Cut tokens [t0, t1) at `layer` out of the request's kept pieces; keep the rest."""
        rest: list[Piece] = []
        parts: list[torch.Tensor] = []
        pos = t0
        for p in sorted(self.pieces.get(rid, []), key=lambda p: (p.layer, p.t0)):
            if p.layer != layer or p.t1 <= t0 or p.t0 >= t1:
                rest.append(p)
                continue
            if p.t0 > pos:
                break
            if p.t0 < t0:
                rest.append(Piece(p.t0, t0, layer, p.h[:t0 - p.t0]))
            b = min(p.t1, t1)
            parts.append(p.h[pos - p.t0:b - p.t0])
            pos = b
            if p.t1 > t1:
                rest.append(Piece(t1, p.t1, layer, p.h[t1 - p.t0:]))
        if pos != t1:
            raise EngineError(f"request {rid}: no hidden state for tokens [{pos}, {t1}) entering "
                              f"layer {layer}")
        self.pieces[rid] = rest
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # [t1 - t0, H]

    def _layer(self, layer: int, x: torch.Tensor, meta: BatchMeta, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer on the batch x [T, H]; returns (x [T, H], distinct experts)."""
        s, lw = self.spec, self.w.layers[layer]
        T, Hq, Hkv, D = x.shape[0], s.num_q_heads, s.num_kv_heads, s.head_dim
        a = rms_norm(x, lw.attn_norm, s.rms_norm_eps)  # [T, H]
        qkv = F.linear(a, lw.wqkv, lw.bqkv)  # [T, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(T, Hq, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
        if lw.q_norm is not None and lw.k_norm is not None:
            q = rms_norm(q, lw.q_norm, s.rms_norm_eps)  # [T, Hq, D]
            k = rms_norm(k, lw.k_norm, s.rms_norm_eps)  # [T, Hkv, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        self.kv.write(layer, meta.slots, k, v)
        o = attend(self.attn_impl, q, self.kv, layer, meta, self.windows[layer])  # [T, Hq D]
        x = x + F.linear(o, lw.wo)  # [T, H]
        m, distinct = self.mlp(rms_norm(x, lw.mlp_norm, s.rms_norm_eps), lw)  # [T, H]
        return x + m, distinct

    # ---- warm-up ----------------------------------------------------------------------------
    def warmup(self, prompt_len: int = 300) -> None:
        """Run a chunked, a layered and a decode step once, so the first timed iteration pays
        no lazy initialisation (kernel selection, allocator growth)."""
        L, rid, rid2 = self.spec.num_layers, -1, -2
        self.add_request(rid, prompt_len)
        self.add_request(rid2, prompt_len)
        half = prompt_len // 2
        mid = L // 2 if L > 1 else L  # a one-layer model has no second group
        self.execute((Tile(rid, 0, half, 0, L, 0), Tile(rid2, 0, prompt_len, 0, mid, 0, mid == L)))
        second = (Tile(rid2, 0, prompt_len, mid, L, 0, True),) if mid < L else ()
        self.execute((Tile(rid, half, prompt_len, 0, L, half, True), *second))
        self.execute((Tile(rid, prompt_len, prompt_len + 1, 0, L, prompt_len, True),
                      Tile(rid2, prompt_len, prompt_len + 1, 0, L, prompt_len, True)))
        self.release(rid)
        self.release(rid2)
