"""The per-token parts of a decoder layer: RMSNorm, rotary embeddings and the MoE / dense MLP.

MoE: the router's softmax picks each token's top-k experts (renormalised where the family does);
the (token, expert) pairs are sorted by expert so every expert's rows are contiguous, run through
one grouped GEMM for gate|up and one for down (torch._grouped_mm, group ends as offsets), scaled
by the routing weights and scattered back with index_add. Where the grouped GEMM is missing or
wrong for this device and dtype (checked numerically once), a loop runs one GEMM pair per
touched expert. Distinct experts per call are counted from the router's choices on the device
(a bincount), so the caller can read every layer's count with one sync per iteration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.weights import LayerWeights, ModelWeights


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps)


class Rotary:
    """cos/sin tables (HF rotate-half convention), grown on demand to the largest position."""

    def __init__(self, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype) -> None:
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device,
                                                      dtype=torch.float64) / head_dim))  # [D/2]
        self.dtype = dtype
        self.cos = torch.empty(0, head_dim, device=device, dtype=dtype)
        self.sin = self.cos

    def tables(self, positions: torch.Tensor, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` [T] (all < max_pos): [T, D] each."""
        if max_pos > self.cos.shape[0]:
            n = max(max_pos, 2 * self.cos.shape[0], 4096)
            t = torch.arange(n, device=self.inv_freq.device, dtype=torch.float64)
            freqs = torch.outer(t, self.inv_freq)  # [n, D/2]
            emb = torch.cat([freqs, freqs], dim=-1)  # [n, D]
            self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, h, D], cos/sin [T, D] -> [T, h, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # [T, h, D]
    return x * cos[:, None, :] + rot * sin[:, None, :]


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """[N, 2I] (gate | up) -> [N, I]."""
    inter = gu.shape[-1] // 2
    return F.silu(gu[:, :inter]) * gu[:, inter:]


class Mlp:
    """The feed-forward half of a layer: experts (plus shared expert) or a dense SwiGLU MLP."""

    def __init__(self, weights: ModelWeights, impl: str = "auto") -> None:
        self.w = weights
        spec = weights.spec
        self.num_experts, self.top_k = spec.num_experts, spec.top_k
        if not spec.is_moe:
            self.impl = "dense"
        elif impl == "auto":
            self.impl = probe_grouped(weights.device, weights.dtype)
        else:
            self.impl = impl

    def __call__(self, a: torch.Tensor, lw: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """a [T, H] (normed) -> (MLP output [T, H], distinct experts touched: 0-dim int tensor)."""
        if self.impl == "dense":
            assert lw.dense_gate_up is not None and lw.dense_down is not None
            out = F.linear(swiglu(F.linear(a, lw.dense_gate_up)), lw.dense_down)  # [T, H]
            return out, torch.zeros((), dtype=torch.long, device=a.device)
        out, distinct = self._experts(a, lw)
        if lw.shared_gate_up is not None:
            assert lw.shared_down is not None and lw.shared_gate is not None
            shared = F.linear(swiglu(F.linear(a, lw.shared_gate_up)), lw.shared_down)  # [T, H]
            out = out + torch.sigmoid(F.linear(a, lw.shared_gate)) * shared  # [T, H]
        return out, distinct

    def _experts(self, a: torch.Tensor, lw: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
        assert lw.router is not None and lw.w_gate_up is not None and lw.w_down is not None
        T, k, E = a.shape[0], self.top_k, self.num_experts
        probs = torch.softmax(F.linear(a, lw.router, lw.router_bias).float(), dim=-1)  # [T, E]
        weight, idx = torch.topk(probs, k, dim=-1)  # [T, k], [T, k]
        if self.w.norm_topk:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        flat = idx.reshape(-1)  # [T k]
        counts = torch.bincount(flat, minlength=E)  # [E]
        distinct = (counts > 0).sum()
        order = torch.argsort(flat, stable=True)  # [T k] pairs grouped by expert
        rows = order // k  # [T k] token of each sorted pair
        xs = a[rows]  # [T k, H]
        if self.impl == "loop":
            ys = self._loop(xs, counts, lw)
        else:
            offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] group ends
            gu = torch._grouped_mm(xs, lw.w_gate_up.transpose(-2, -1), offs=offs)  # [T k, 2I]
            ys = torch._grouped_mm(swiglu(gu), lw.w_down.transpose(-2, -1), offs=offs)  # [T k, H]
        ys = ys * weight.reshape(-1)[order].to(ys.dtype)[:, None]  # [T k, H]
        out = torch.zeros(T, a.shape[1], device=a.device, dtype=a.dtype)  # [T, H]
        out.index_add_(0, rows, ys)
        return out, distinct

    @staticmethod
    def _loop(xs: torch.Tensor, counts: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        assert lw.w_gate_up is not None and lw.w_down is not None
        ys = torch.empty_like(xs)  # [T k, H]
        start = 0
        for e, n in enumerate(counts.tolist()):  # one host sync per layer: the loop needs sizes
            if n:
                gu = F.linear(xs[start:start + n], lw.w_gate_up[e])  # [n, 2I]
                ys[start:start + n] = F.linear(swiglu(gu), lw.w_down[e])  # [n, H]
                start += n
        return ys


_PROBED: dict[tuple[str, torch.dtype], str] = {}


def probe_grouped(device: torch.device, dtype: torch.dtype) -> str:
    """'grouped_mm' if torch._grouped_mm gives the loop's answer here (uneven and empty groups
    included, weights as the column-major views the engine passes), else 'loop'."""
    key = (str(device), dtype)
    if key in _PROBED:
        return _PROBED[key]
    impl = "loop"
    if hasattr(torch, "_grouped_mm"):
        gen = torch.Generator(device=device)
        gen.manual_seed(1)
        x = torch.randn(40, 64, device=device, dtype=dtype, generator=gen)  # [40, K]
        w = torch.randn(4, 32, 64, device=device, dtype=dtype, generator=gen)  # [E, N, K]
        sizes = (7, 0, 21, 12)
        offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
        ref, s = [], 0
        for e, n in enumerate(sizes):
            ref.append(x[s:s + n].float() @ w[e].float().T)
            s += n
        try:
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).float()
            r = torch.cat(ref)
            if torch.allclose(y, r, rtol=3e-2, atol=3e-2 * float(r.abs().max())):
                impl = "grouped_mm"
        except (RuntimeError, NotImplementedError, TypeError):
            pass
    _PROBED[key] = impl
    return impl
