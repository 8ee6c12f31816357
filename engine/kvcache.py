"""A paged KV cache and the attention metadata of one batch of tiles.

The pool is preallocated: per layer, K and V of shape [pages, page_size, kv_heads, head_dim].
Two ways to own pages. Standalone (tests, warm-up, benchmarks): a request takes pages from
the cache's own free list as its tokens grow (`ensure`) and returns them (`release`). Served
(engine/serve.py): the pages are the replica's KV blocks - page id = block id of the replica
state's core.blocks.BlockPool, page size = its block size - and a request's page table is its
block table (`block_ids`, token order), passed to `batch_meta` as `tables`; the pool allocates,
shares (prefix caching) and frees them, the free list here is not used. Token p of a request
lives in slot pages[p // page_size] * page_size + p % page_size of the flattened pool.
The default page size is 256 because FlashAttention's paged kernels require a multiple of 256;
SDPA (and so the CPU) takes any size (`repage`).

`batch_meta` turns the tiles active in a layer (decodes first) into what attention needs:
token positions, the slots their new K/V go to, per-tile key ranges and page tables, and the
packed varlen form (cumulative query lengths, key lengths, block table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

PAGE_SIZE = 256


class KVPoolFull(RuntimeError):
    """The engine's KV pool has no free page (the pool is smaller than the policy's view)."""


class PagedKV:
    def __init__(self, num_layers: int, num_pages: int, kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype, page_size: int = PAGE_SIZE) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        # Zeros, not empty: padded reads of unused slots must stay finite (0 * NaN is NaN).
        self.k = torch.zeros(num_layers, num_pages, page_size, kv_heads, head_dim, device=device,
                             dtype=dtype)  # [L, pages, P, Hkv, D]
        self.v = torch.zeros_like(self.k)  # [L, pages, P, Hkv, D]
        self._free = list(range(num_pages - 1, -1, -1))
        self.pages: dict[int, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def repage(self, page_size: int) -> None:
        """Lay the same memory out in pages of `page_size` tokens (pages of the old size must
        all be free): a view where the token count divides, else reallocated smaller."""
        if page_size == self.page_size:
            return
        if page_size < 1:
            raise ValueError(f"page size must be >= 1, got {page_size}")
        if self.pages:
            raise RuntimeError("repage with pages in use")
        L, _, _, Hkv, D = self.k.shape
        tokens = self.capacity_tokens
        num_pages = tokens // page_size
        if tokens % page_size == 0:
            self.k = self.k.view(L, num_pages, page_size, Hkv, D)
            self.v = self.v.view(L, num_pages, page_size, Hkv, D)
        else:
            device, dtype = self.k.device, self.k.dtype
            del self.k, self.v
            self.k = torch.zeros(L, num_pages, page_size, Hkv, D, device=device, dtype=dtype)
            self.v = torch.zeros_like(self.k)
        self.page_size, self.num_pages = page_size, num_pages
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def ensure(self, req_id: int, num_tokens: int) -> None:
        pages = self.pages.setdefault(req_id, [])
        need = -(-num_tokens // self.page_size) - len(pages)
        if need > len(self._free):
            raise KVPoolFull(f"KV pool full: request {req_id} needs {need} more pages of "
                             f"{self.page_size} tokens, {len(self._free)} free of {self.num_pages}")
        for _ in range(need):
            pages.append(self._free.pop())

    def release(self, req_id: int) -> None:
        self._free.extend(reversed(self.pages.pop(req_id, [])))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, Hkv, D] into flat slots [T]."""
        kf = self.k[layer].view(-1, *self.k.shape[-2:])  # [pages P, Hkv, D]
        vf = self.v[layer].view(-1, *self.v.shape[-2:])  # [pages P, Hkv, D]
        kf.index_copy_(0, slots, k)
        vf.index_copy_(0, slots, v)


@dataclass(frozen=True)
class ActiveTile:
    """A tile's part of one layer's batch: its request and token range [t0, t1)."""
    req_id: int
    t0: int
    t1: int


@dataclass
class PrefillSeg:
    row0: int  # rows [row0, row1) of the layer batch
    row1: int
    t0: int
    t1: int
    pages: torch.Tensor  # [ceil(t1 / P)] long


@dataclass
class BatchMeta:
    positions: torch.Tensor  # [T] long
    max_pos: int
    slots: torch.Tensor  # [T] long
    num_decodes: int  # leading single-token tiles, attended as one batch
    dec_pages: torch.Tensor | None  # [B, maxp] long (page 0 pads)
    dec_len: torch.Tensor | None  # [B] long: keys each decode sees, itself included
    prefills: list[PrefillSeg]
    # Packed (varlen) form over all tiles, decodes included.
    cu_q: torch.Tensor  # [N + 1] int32
    cu_k: torch.Tensor  # [N + 1] int32
    seqused_k: torch.Tensor  # [N] int32
    block_table: torch.Tensor  # [N, maxp] int32
    max_q: int
    max_k: int


def batch_meta(tiles: Sequence[ActiveTile], kv: PagedKV, device: torch.device,
               tables: Mapping[int, Sequence[int]] | None = None) -> BatchMeta:
    """Metadata for tiles in row order; single-token tiles must come first. A request's pages
    are `tables[req_id]` when given (served: its block table), else the cache's own."""
    P = kv.page_size
    n = np.array([t.t1 - t.t0 for t in tiles], dtype=np.int64)
    t0 = np.array([t.t0 for t in tiles], dtype=np.int64)
    t1 = t0 + n
    positions = np.concatenate([np.arange(a, b) for a, b in zip(t0, t1, strict=True)])
    owner = kv.pages if tables is None else tables
    page_rows = [np.asarray(owner[t.req_id][:-(-t.t1 // P)], dtype=np.int64) for t in tiles]
    slots = np.concatenate([pr[np.arange(a, b) // P] * P + np.arange(a, b) % P
                            for pr, a, b in zip(page_rows, t0, t1, strict=True)])
    maxp = max(len(pr) for pr in page_rows)
    table = np.zeros((len(tiles), maxp), dtype=np.int64)
    for i, pr in enumerate(page_rows):
        table[i, :len(pr)] = pr
    B = 0
    while B < len(tiles) and n[B] == 1:
        B += 1
    rows = np.concatenate([[0], np.cumsum(n)])

    def dev(a: np.ndarray, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.from_numpy(a).to(device=device, dtype=dtype, non_blocking=True)

    table_dev = dev(table)
    prefills = [PrefillSeg(int(rows[i]), int(rows[i + 1]), int(t0[i]), int(t1[i]),
                           table_dev[i, :len(page_rows[i])])
                for i in range(B, len(tiles))]
    cu_k = np.concatenate([[0], np.cumsum(t1)])
    return BatchMeta(
        positions=dev(positions), max_pos=int(t1.max()), slots=dev(slots), num_decodes=B,
        dec_pages=table_dev[:B, :max(1, max((len(pr) for pr in page_rows[:B]), default=1))] if B else None,
        dec_len=dev(t1[:B].copy()) if B else None, prefills=prefills,
        cu_q=dev(rows, torch.int32), cu_k=dev(cu_k, torch.int32), seqused_k=dev(t1, torch.int32),
        block_table=table_dev.to(torch.int32), max_q=int(n.max()), max_k=int(t1.max()))
