"""A plain full-sequence forward pass over the engine's weights: the function every schedule
must compute.

No cache, no tiles, no paging: the whole token sequence goes through every layer at once, with
attention as explicit softmax(QK^T / sqrt(D)) V under a causal (and, on sliding layers, window)
mask, K/V heads repeated for GQA, and each expert applied to exactly the tokens that chose it.
It is written independently of the engine's kernels so a test can compare them; it is slow and
for tests only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from engine.weights import ModelWeights


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [S, h, D] at positions 0..S-1, rotate-half convention."""
    S, _, D = x.shape
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)  # [D/2]
    ang = torch.arange(S, dtype=torch.float64, device=x.device)[:, None] * inv[None]  # [S, D/2]
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]  # [S, 1, D/2]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # [S, h, D]


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    g, u = (x @ gate_up.T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ down.T


@torch.no_grad()
def reference_forward(w: ModelWeights, token_ids: Sequence[int]) -> torch.Tensor:
    """Logits [S, V] (fp32) of every position of `token_ids`."""
    s = w.spec
    S, Hq, Hkv, D, eps = len(token_ids), s.num_q_heads, s.num_kv_heads, s.head_dim, s.rms_norm_eps
    x = w.embed[torch.tensor(list(token_ids), device=w.device)]  # [S, H]
    pos = torch.arange(S, device=w.device)
    for l, lw in enumerate(w.layers):
        a = _norm(x, lw.attn_norm, eps)
        qkv = a @ lw.wqkv.T + (lw.bqkv if lw.bqkv is not None else 0)  # [S, (Hq + 2 Hkv) D]
        q = qkv[:, :Hq * D].reshape(S, Hq, D)
        k = qkv[:, Hq * D:(Hq + Hkv) * D].reshape(S, Hkv, D)
        v = qkv[:, (Hq + Hkv) * D:].reshape(S, Hkv, D)
        if lw.q_norm is not None and lw.k_norm is not None:
            q, k = _norm(q, lw.q_norm, eps), _norm(k, lw.k_norm, eps)
        q, k = _rope(q, s.rope_theta), _rope(k, s.rope_theta)
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # [S, Hq, D]
        v = v.repeat_interleave(Hq // Hkv, dim=1)  # [S, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) / D ** 0.5  # [Hq, S, S]
        allowed = pos[None, :] <= pos[:, None]  # [S, S] key <= query
        if s.sliding_layers[l]:
            allowed &= pos[None, :] > pos[:, None] - s.sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(x.dtype)  # [S, Hq, D]
        x = x + o.reshape(S, Hq * D) @ lw.wo.T
        a = _norm(x, lw.mlp_norm, eps)
        if lw.router is None:
            assert lw.dense_gate_up is not None and lw.dense_down is not None
            x = x + _mlp(a, lw.dense_gate_up, lw.dense_down)
            continue
        assert lw.w_gate_up is not None and lw.w_down is not None
        probs = (a @ lw.router.T).float().softmax(-1)  # [S, E]
        top_w, top_i = probs.topk(s.top_k, dim=-1)  # [S, k]
        if w.norm_topk:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        moe = torch.zeros_like(x)  # [S, H]
        for e in range(s.num_experts):
            tok, slot = (top_i == e).nonzero(as_tuple=True)
            if len(tok):
                y = _mlp(a[tok], lw.w_gate_up[e], lw.w_down[e])  # [n, H]
                moe[tok] += top_w[tok, slot, None].to(x.dtype) * y
        if lw.shared_gate_up is not None:
            assert lw.shared_down is not None and lw.shared_gate is not None
            moe += torch.sigmoid(a @ lw.shared_gate.T) * _mlp(a, lw.shared_gate_up, lw.shared_down)
        x = x + moe
    return (_norm(x, w.final_norm, eps) @ w.lm_head.T).float()  # [S, V]
