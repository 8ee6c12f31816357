"""Time one grid shape of each operation class with torch.

Method. Each shape gets a few sets of inputs drawn at random (never zeros: some kernels and
memory compressors shortcut them), enough sets that together they exceed the last-level cache,
and calls rotate through the sets so no call finds its weights cached by the previous one.
After a warm-up, every call is timed on its own - CUDA events on a GPU, perf_counter on the CPU
(where torch ops are synchronous) - and the median is kept. A GPU runs the model's bf16; the
CPU runs fp32, which is what its BLAS is fast at. Attention (prefill and decode) is not a bare
kernel call: it runs the engine's own paged-KV code (engine.attention.attend, with the
implementation the engine probes for), because that is what the simulator's predictions are
validated against. FLOPs and bytes come from the cost model (grid.quantities), never from here.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from calibrate.grid import Dims, Shape
from costmodel import ConfigError
from engine.attention import attend, probe_attention
from engine.kvcache import PAGE_SIZE, ActiveTile, PagedKV, batch_meta

Tensors = tuple[torch.Tensor, ...]
Kernel = Callable[..., Any]

# Preset names by the marketing name CUDA reports ("NVIDIA H200", "NVIDIA H100 80GB HBM3").
GPU_PRESETS = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("B200", "b200"))


class CalibrationError(ConfigError):
    """A one-line user-facing error (no GPU, no pynvml, unknown GPU)."""


@dataclass
class Ctx:
    device: torch.device
    dtype: torch.dtype
    preset: str  # costmodel GPU preset the profile refines
    name: str  # what the hardware calls itself
    rotate_bytes: int  # inputs per shape span at least this much (a few times the LLC)
    budget_s: float  # timing budget per shape
    max_repeats: int
    info: dict[str, Any] = field(default_factory=dict)
    grouped: str = "loop"  # "grouped_mm", "grouped_mm_t" (column-major weights) or "loop"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


def open_device(spec: str, quick: bool, threads: int = 1) -> Ctx:
    """Validate the device string and set it up; CalibrationError says what is missing.

    CPU threads default to 1: on small shared VMs (CI runners) a descheduled OpenMP worker
    stalls every multi-threaded op for a scheduler quantum (we saw 2-thread medians jump from
    0.2 ms to 8-30 ms), while one thread times reproducibly.
    """
    if spec == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, min(threads, cores or 1)))
        torch.manual_seed(0)
        return Ctx(torch.device("cpu"), torch.float32, "cpu", _cpu_name(), 32 << 20,
                   0.02 if quick else 0.05, 15,
                   info={"torch_threads": torch.get_num_threads(), "dtype": "float32"})
    if not spec.startswith("cuda"):
        raise CalibrationError(f"--device {spec}: expected 'cpu' or 'cuda:N'")
    try:
        index = int(spec.partition(":")[2] or 0)
    except ValueError:
        raise CalibrationError(f"--device {spec}: expected 'cpu' or 'cuda:N'") from None
    if not torch.cuda.is_available():  # first: without a GPU, a missing NVML is beside the point
        raise CalibrationError(f"--gpu {index}: this machine has no CUDA GPU that torch "
                               f"{torch.__version__} can see; use --device cpu, or --from-tables")
    try:
        import pynvml  # noqa: F401  (needed for the energy counter)
    except ImportError:
        raise CalibrationError("GPU calibration needs nvidia-ml-py (pip install 'layersim[gpu]')") from None
    if index >= torch.cuda.device_count():
        raise CalibrationError(f"--gpu {index}: only {torch.cuda.device_count()} GPU(s) visible")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device)
    preset = next((p for key, p in GPU_PRESETS if key in name.upper()), None)
    if preset is None:
        raise CalibrationError(f"GPU '{name}' has no preset in costmodel/gpu.py to refine")
    cap = torch.cuda.get_device_capability(device)
    return Ctx(device, torch.bfloat16, preset, name, 512 << 20, 0.04 if quick else 0.08, 100,
               info={"dtype": "bfloat16", "compute_capability": f"{cap[0]}.{cap[1]}",
                     "cuda_version": torch.version.cuda})


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _randn(ctx: Ctx, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=ctx.device, dtype=ctx.dtype)


# ---- timing -------------------------------------------------------------------------------------
def time_kernel(ctx: Ctx, fn: Kernel, sets: list[Tensors]) -> float:
    """Median seconds per call of fn(*set), rotating through the input sets."""
    n = len(sets)
    fn(*sets[0])  # first call: allocator, kernel selection, lazy init
    ctx.sync()
    t0 = time.perf_counter()
    fn(*sets[1 % n])
    ctx.sync()
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(ctx.max_repeats, max(5, ctx.budget_s / est)))
    for i in range(min(3, reps)):  # warm-up: clocks up, caches of the code path filled
        fn(*sets[(i + 2) % n])
    if ctx.is_cuda:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
        ctx.sync()
        for i, (a, b) in enumerate(ev):
            a.record()
            fn(*sets[i % n])
            b.record()
        ctx.sync()
        times = [a.elapsed_time(b) / 1e3 for a, b in ev]  # ms -> s
    else:
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            fn(*sets[i % n])
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rotated(ctx: Ctx, make: Callable[[], Tensors]) -> list[Tensors]:
    """As many random input sets as it takes to exceed ctx.rotate_bytes (1 to 8)."""
    first = make()
    size = sum(t.numel() * t.element_size() for t in first)
    count = min(8, max(1, math.ceil(ctx.rotate_bytes / max(size, 1))))
    return [first] + [make() for _ in range(count - 1)]


def measure_cpu_peaks(ctx: Ctx, quick: bool) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s): the CPU's stand-ins for datasheet peaks."""
    n = 768 if quick else 1024
    t = time_kernel(ctx, torch.mm, [(_randn(ctx, n, n), _randn(ctx, n, n)) for _ in range(2)])
    peak_flops = 2.0 * n**3 / t
    count = 16 << 20  # 64 MB of fp32, 8x a typical L3: a DRAM copy, not a cache copy
    src, dst = _randn(ctx, count), _randn(ctx, count)
    t = time_kernel(ctx, lambda s, d: d.copy_(s), [(src, dst)])
    return peak_flops, 2.0 * count * 4 / t  # read + write


# ---- kernels ------------------------------------------------------------------------------------
def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _gemm_pair(x: torch.Tensor, w1: torch.Tensor, a: torch.Tensor, w2: torch.Tensor) -> None:
    # MLP GEMMs only (gate_up, down): the activation between them is priced as elementwise.
    F.linear(x, w1)
    F.linear(a, w2)


def probe_grouped(ctx: Ctx, dims: Dims) -> str:
    """Which grouped-GEMM path works here for this dtype and these widths, checked numerically."""
    if not hasattr(torch, "_grouped_mm"):
        return "loop"
    k, n, rows = dims.hidden, 2 * dims.expert_inter, 16
    x = _randn(ctx, 2 * rows, k)
    w = _randn(ctx, 2, k, n)
    offs = torch.tensor([rows, 2 * rows], device=ctx.device, dtype=torch.int32)
    ref = torch.cat([x[:rows] @ w[0], x[rows:] @ w[1]]).float()
    for kind, wt in (("grouped_mm", w), ("grouped_mm_t", w.transpose(-2, -1).contiguous().transpose(-2, -1))):
        try:
            y = torch._grouped_mm(x, wt, offs=offs).float()
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        if torch.allclose(y, ref, rtol=5e-2, atol=5e-2 * float(ref.abs().max())):
            return kind
    return "loop"


def _experts(ctx: Ctx, dims: Dims, e: int, t: int) -> tuple[Kernel, Callable[[], Tensors]]:
    h, inter = dims.hidden, dims.expert_inter
    offs = torch.arange(1, e + 1, device=ctx.device, dtype=torch.int32) * t  # [e] group ends

    def weights(k: int, n: int) -> torch.Tensor:
        if ctx.grouped == "grouped_mm_t":  # column-major per expert, as the CUDA kernel likes
            return _randn(ctx, e, n, k).transpose(-2, -1)  # [e, k, n]
        return _randn(ctx, e, k, n)  # [e, k, n]

    def make() -> Tensors:
        return (_randn(ctx, e * t, h), weights(h, 2 * inter),  # [e*t, h], [e, h, 2I]
                _randn(ctx, e * t, inter), weights(inter, h))  # [e*t, I], [e, I, h]

    if ctx.grouped == "loop":
        def run(x: torch.Tensor, w1: torch.Tensor, a: torch.Tensor, w2: torch.Tensor) -> None:
            for i in range(e):  # one GEMM pair per touched expert
                x[i * t:(i + 1) * t] @ w1[i]  # [t, 2I]
                a[i * t:(i + 1) * t] @ w2[i]  # [t, h]
    else:
        def run(x: torch.Tensor, w1: torch.Tensor, a: torch.Tensor, w2: torch.Tensor) -> None:
            torch._grouped_mm(x, w1, offs=offs)  # [e*t, 2I]
            torch._grouped_mm(a, w2, offs=offs)  # [e*t, h]
    return run, make


def probe_engine_attention(ctx: Ctx, dims: Dims) -> str:
    """The attention implementation the engine picks on this device ('varlen' or 'sdpa')."""
    return probe_attention(ctx.device, ctx.dtype, dims.kv_heads, dims.q_heads, dims.head_dim)


def _paged(ctx: Ctx, dims: Dims, tiles: list[ActiveTile]) -> tuple[Kernel, Callable[[], Tensors]]:
    """One layer's attention over `tiles` exactly as the engine runs it (engine.attention.attend).

    The engine does not attend over contiguous K/V: it reads them from its page pool, and its
    SDPA path (the CPU, and GPUs without paged FlashAttention) gathers each request's pages into
    a padded buffer and masks the padding - about twice a plain SDPA call at long contexts, many
    times it at short ones (a whole 256-token page and ~10 small ops per call). Timing that code
    is what makes the fitted attention parameters describe the engine `validate` runs. Only
    `attend` is timed: the batch metadata is built once per iteration and shared by all layers
    (host overhead), and writing the new K/V is a few rows.
    """
    hq, hkv, d = dims.q_heads, dims.kv_heads, dims.head_dim
    impl = ctx.info.get("attention") or probe_engine_attention(ctx, dims)
    # Page bookkeeping only: a pool on the meta device allocates nothing; each input set brings
    # its own random K/V pool and the kernel swaps it in before the call.
    kv = PagedKV(1, sum(-(-t.t1 // PAGE_SIZE) for t in tiles), hkv, d, torch.device("meta"), ctx.dtype)
    for t in tiles:
        kv.ensure(t.req_id, t.t1)  # requests take consecutive pages, as in a fresh engine
    meta = batch_meta(tiles, kv, ctx.device)  # decodes first, as the engine orders them
    rows = sum(t.t1 - t.t0 for t in tiles)
    pool = kv.k.shape  # [1, pages, P, Hkv, D]

    def make() -> Tensors:
        return (_randn(ctx, rows, hq, d), _randn(ctx, *pool), _randn(ctx, *pool))  # [T, Hq, D], K, V

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv.k, kv.v = k, v
        return attend(impl, q, kv, 0, meta, 0)  # [T, Hq D]; no sliding window, as dec_kv/pf_kv
    return run, make


def _prefill(ctx: Ctx, dims: Dims, n: int, c: int) -> tuple[Kernel, Callable[[], Tensors]]:
    # n new tokens of one request after c cached ones: one tile, causal to the bottom right.
    return _paged(ctx, dims, [ActiveTile(0, c, c + n)])


def _decode(ctx: Ctx, dims: Dims, b: int, c: int) -> tuple[Kernel, Callable[[], Tensors]]:
    # `c` counts the new token (grid.features): each decode sees c keys, itself included.
    return _paged(ctx, dims, [ActiveTile(r, c - 1, c) for r in range(b)])


def _elementwise(ctx: Ctx, dims: Dims, t: int) -> tuple[Kernel, Callable[[], Tensors]]:
    h = dims.hidden
    inter, rows = (dims.expert_inter, t * dims.top_k) if dims.num_experts else (dims.dense_inter, t)
    eps = 1e-6

    def make() -> Tensors:
        return (_randn(ctx, t, h), _randn(ctx, t, h), _randn(ctx, h),  # [T, h], [T, h], [h]
                _randn(ctx, rows, 2 * inter))  # [T*k, 2I] gate|up of the routed rows

    def run(x: torch.Tensor, res: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> None:
        # A layer's non-GEMM work: two RMSNorms, the residual add, the SwiGLU activation.
        F.rms_norm(x, (h,), w, eps)  # [T, h]
        r = x + res  # [T, h]
        F.rms_norm(r, (h,), w, eps)  # [T, h]
        F.silu(g[:, :inter]) * g[:, inter:]  # [T*k, I]
    return run, make


def build(ctx: Ctx, dims: Dims, shape: Shape) -> tuple[Kernel, list[Tensors]]:
    """The callable and its rotated input sets for one grid shape."""
    p, h = shape.params, dims.hidden
    widths = {"qkv_proj": (h, dims.q_dim + 2 * dims.kv_dim), "o_proj": (dims.q_dim, h),
              "router": (h, dims.num_experts), "lm_head": (h, dims.vocab)}
    if shape.op in widths:
        k, n = widths[shape.op]
        t = p["tokens"]
        return _linear, rotated(ctx, lambda: (_randn(ctx, t, k), _randn(ctx, n, k)))  # [T, K], [N, K]
    if shape.op in ("shared_experts", "dense_mlp"):
        inter = dims.shared_inter if shape.op == "shared_experts" else dims.dense_inter
        t = p["tokens"]
        return _gemm_pair, rotated(ctx, lambda: (_randn(ctx, t, h), _randn(ctx, 2 * inter, h),
                                                 _randn(ctx, t, inter), _randn(ctx, h, inter)))
    if shape.op == "embedding":
        t = p["tokens"]

        def make_emb() -> Tensors:
            ids = torch.randint(0, dims.vocab, (t,), device=ctx.device)  # [T]
            return ids, _randn(ctx, dims.vocab, h)  # [V, h]
        return F.embedding, rotated(ctx, make_emb)
    makers = {"experts": lambda: _experts(ctx, dims, p["experts"], p["tokens_per_expert"]),
              "prefill_attn": lambda: _prefill(ctx, dims, p["new"], p["cached"]),
              "decode_attn": lambda: _decode(ctx, dims, p["batch"], p["context"]),
              "norms_elementwise": lambda: _elementwise(ctx, dims, p["tokens"])}
    if shape.op not in makers:
        raise ValueError(f"no kernel for op '{shape.op}'")
    fn, make = makers[shape.op]()
    return fn, rotated(ctx, make)
