"""Attention of one layer over the paged KV cache, for every tile of the batch at once.

Each tile's queries (tokens [t0, t1) of one request) attend causally to that request's keys
[0, t1): the cached context [0, t0) plus themselves, the mask aligned to the bottom-right
corner; sliding-window layers keep only the last `window` keys of each query (HF semantics:
key j is visible to the query at p when p - window < j <= p).

Two implementations, chosen once per engine by a numerical probe:
  varlen  one FlashAttention varlen call over the packed queries of all tiles, reading K/V
          straight from the pages through the block table (CUDA, bf16/fp16);
  sdpa    torch SDPA: single-token tiles (decodes) as one batch whose padded contexts are
          gathered from the pages and masked, the query heads of each KV head folded into the
          query axis (no K/V repetition); every longer tile gets its own SDPA call with GQA
          and a bottom-right causal (or window) mask. Runs everywhere, including the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from engine.kvcache import ActiveTile, BatchMeta, PagedKV, batch_meta


def attend(impl: str, q: torch.Tensor, kv: PagedKV, layer: int, meta: BatchMeta,
           window: int) -> torch.Tensor:
    """q [T, Hq, D] (rows as in `meta`) -> [T, Hq D]; the batch's K/V are already written."""
    if impl == "varlen":
        return _varlen(q, kv, layer, meta, window)
    return _sdpa(q, kv, layer, meta, window)


def _varlen(q: torch.Tensor, kv: PagedKV, layer: int, meta: BatchMeta, window: int) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    T, Hq, D = q.shape
    Hkv = kv.k.shape[-2]
    out = varlen_attn(q, kv.k[layer], kv.v[layer], meta.cu_q, meta.cu_k, meta.max_q, meta.max_k,
                      window_size=(window - 1, 0) if window else (-1, 0), enable_gqa=Hq != Hkv,
                      seqused_k=meta.seqused_k, block_table=meta.block_table)  # [T, Hq, D]
    assert isinstance(out, torch.Tensor)
    return out.reshape(T, Hq * D)


def _sdpa(q: torch.Tensor, kv: PagedKV, layer: int, meta: BatchMeta, window: int) -> torch.Tensor:
    T, Hq, D = q.shape
    Hkv = kv.k.shape[-2]
    P = kv.page_size
    out = torch.empty(T, Hq * D, device=q.device, dtype=q.dtype)  # [T, Hq D]
    B = meta.num_decodes
    if B:
        assert meta.dec_pages is not None and meta.dec_len is not None
        maxp = meta.dec_pages.shape[1]
        C = maxp * P
        k = kv.k[layer][meta.dec_pages].view(B, C, Hkv, D).transpose(1, 2)  # [B, Hkv, C, D]
        v = kv.v[layer][meta.dec_pages].view(B, C, Hkv, D).transpose(1, 2)  # [B, Hkv, C, D]
        qd = q[:B].view(B, Hkv, Hq // Hkv, D)  # [B, Hkv, G, D]: a KV head's queries as rows
        j = torch.arange(C, device=q.device)  # [C]
        keep = j[None, :] < meta.dec_len[:, None]  # [B, C]
        if window:
            keep &= j[None, :] >= meta.dec_len[:, None] - window
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=keep[:, None, None, :])  # [B, Hkv, G, D]
        out[:B] = o.reshape(B, Hq * D)
    for seg in meta.prefills:
        n, t1 = seg.row1 - seg.row0, seg.t1
        k = kv.k[layer][seg.pages].view(-1, Hkv, D)[:t1].transpose(0, 1)[None]  # [1, Hkv, t1, D]
        v = kv.v[layer][seg.pages].view(-1, Hkv, D)[:t1].transpose(0, 1)[None]  # [1, Hkv, t1, D]
        qs = q[seg.row0:seg.row1].transpose(0, 1)[None]  # [1, Hq, n, D]
        mask: Any
        if window and t1 > window:
            p = torch.arange(seg.t0, t1, device=q.device)[:, None]  # [n, 1]
            kj = torch.arange(t1, device=q.device)[None, :]  # [1, t1]
            mask = (kj <= p) & (kj > p - window)  # [n, t1]
        else:
            mask = causal_lower_right(n, t1) if seg.t0 else None
        gqa = Hq != Hkv
        if gqa and q.is_cuda:
            # SDPA's GPU kernels for a bottom-right mask (flash, efficient) take equal head counts;
            # with GQA it could fall back to the math kernel's [Hq, n, t1] scores.
            k = k.repeat_interleave(Hq // Hkv, dim=1)  # [1, Hq, t1, D]
            v = v.repeat_interleave(Hq // Hkv, dim=1)  # [1, Hq, t1, D]
            gqa = False
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=gqa)  # [1, Hq, n, D]
        out[seg.row0:seg.row1] = o[0].transpose(0, 1).reshape(n, Hq * D)
    return out


def probe_attention(device: torch.device, dtype: torch.dtype, kv_heads: int, q_heads: int,
                    head_dim: int) -> str:
    """'varlen' where the paged FlashAttention call runs and matches SDPA (window included) on
    a decode plus a chunk with cached context, else 'sdpa'."""
    if device.type != "cuda":
        return "sdpa"
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return "sdpa"
    gen = torch.Generator(device=device)
    gen.manual_seed(2)
    kv = PagedKV(1, 8, kv_heads, head_dim, device, dtype)
    tiles = [ActiveTile(0, 300, 301), ActiveTile(1, 200, 520)]
    for t in tiles:
        kv.ensure(t.req_id, t.t1)
        s = batch_meta([ActiveTile(t.req_id, 0, t.t1)], kv, device).slots
        kv.write(0, s, torch.randn(t.t1, kv_heads, head_dim, device=device, dtype=dtype, generator=gen),
                 torch.randn(t.t1, kv_heads, head_dim, device=device, dtype=dtype, generator=gen))
    meta = batch_meta(tiles, kv, device)
    q = torch.randn(321, q_heads, head_dim, device=device, dtype=dtype, generator=gen)  # [T, Hq, D]
    try:
        for window in (0, 128):
            ref = _sdpa(q, kv, 0, meta, window).float()
            got = _varlen(q, kv, 0, meta, window).float()
            if not torch.allclose(got, ref, rtol=2e-2, atol=2e-2):
                return "sdpa"
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return "sdpa"
    return "varlen"
