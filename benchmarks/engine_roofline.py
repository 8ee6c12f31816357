"""How close the engine runs to the hardware: decode against the HBM roofline, prefill against
the FLOP roofline.

Decode: B requests with a cached context of C tokens each (KV pages taken without running their
prefill) take one decode step together; the time is the median of a few runs. The bytes that
must move are the cost model's count for that plan at the engine's dtype, with the expert
weights replaced by what the router touched: dense weights read once, distinct experts x bytes
per expert, the KV cache read and written, activations. Achieved bandwidth = bytes / time,
compared with the datasheet bandwidth and with a measured device copy (read + write bytes /
time of a large tensor copy).

Prefill: one fresh prompt of N tokens through every layer; achieved FLOP/s = the cost model's
FLOPs for the tile / time, compared with the datasheet peak and with a measured large matmul.

    python benchmarks/engine_roofline.py                                  # tiny-moe on the CPU
    python benchmarks/engine_roofline.py --model qwen3-30b-a3b --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from costmodel import CostModel, Tile, load_gpu, load_model  # noqa: E402
from engine.executor import Engine  # noqa: E402


def _timed(fn, device: torch.device, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measured_peaks(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(matmul FLOP/s, copy bytes/s) on this device in the engine's dtype."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    flops = 2.0 * n ** 3 / _timed(lambda: a @ b, device, 5)
    count = (1 << 30) if device.type == "cuda" else (32 << 20)  # far beyond the last-level cache
    src = torch.empty(count // a.element_size(), device=device, dtype=dtype).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    bw = 2.0 * count / _timed(lambda: dst.copy_(src), device, 5)
    return flops, bw


def time_decode(eng: Engine, counting: CostModel, datasheet_bw: float, copy_bw: float, batch: int,
                context: int, repeats: int) -> dict[str, Any]:
    """One decode step of `batch` requests at `context` cached tokens, against the HBM roofline."""
    L = eng.spec.num_layers
    ids = list(range(1000, 1000 + batch))
    for r in ids:
        eng.fake_context(r, context)
    plan = tuple(Tile(r, context, context + 1, 0, L, context, True) for r in ids)
    touched: list[int] = []

    def step() -> None:
        for r in ids:  # rewind so every run decodes the same position
            del eng.tokens[r][context + 1:]
        touched[:] = eng.execute(plan).experts_touched

    step()
    t = _timed(step, eng.device, repeats)
    cost = counting.price(plan)
    per_expert = eng.spec.expert_params * counting.model.expert_weight_bytes
    nbytes = cost.hbm_bytes.total - cost.hbm_bytes.expert_weights + sum(touched) * per_expert
    for r in ids:
        eng.release(r)
    return {"kind": "decode", "batch": batch, "context": context, "time_ms": t * 1e3,
            "bytes_gb": nbytes / 1e9, "achieved_gbps": nbytes / t / 1e9,
            "of_datasheet": nbytes / t / datasheet_bw, "of_measured_copy": nbytes / t / copy_bw}


def time_prefill(eng: Engine, counting: CostModel, datasheet_flops: float, matmul_flops: float,
                 n: int, repeats: int) -> dict[str, Any]:
    """One fresh prompt of n tokens through every layer, against the FLOP roofline."""
    rid = 5000 + n
    eng.add_request(rid, n)
    plan = (Tile(rid, 0, n, 0, eng.spec.num_layers, 0, True),)

    def prefill() -> None:
        del eng.tokens[rid][n:]
        eng.execute(plan)

    prefill()
    t = _timed(prefill, eng.device, repeats)
    eng.release(rid)
    flops = counting.price(plan).flops
    return {"kind": "prefill", "tokens": n, "time_ms": t * 1e3, "tflop": flops / 1e12,
            "achieved_tflops": flops / t / 1e12, "of_datasheet": flops / t / datasheet_flops,
            "of_measured_matmul": flops / t / matmul_flops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-moe")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpu", default=None, help="GPU preset for datasheet peaks (default from the device)")
    p.add_argument("--batch", default="1,8,32", help="decode batch sizes")
    p.add_argument("--context", type=int, default=1024, help="cached tokens per decoding request")
    p.add_argument("--prefill", default="512,2048", help="prefill prompt lengths")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    spec = load_model(args.model)
    batches = [int(x) for x in args.batch.split(",")]
    prefills = [int(x) for x in args.prefill.split(",")]
    kv_tokens = max(batches) * (args.context + 256) + 2 * max(prefills) + 4096
    eng = Engine(spec, device, kv_tokens=kv_tokens)
    eng.warmup()
    preset = args.gpu or ("cpu" if device.type == "cpu" else
                          next((k for k in ("h200", "h100", "a100", "b200")
                                if k.upper() in torch.cuda.get_device_name(device).upper()), "h100"))
    hw = load_gpu(preset)
    es = float(torch.empty(0, dtype=eng.dtype).element_size())
    # Count bytes at the dtype the engine really moves (fp32 on the CPU).
    counting = CostModel(spec.with_overrides(weight_bytes=es, expert_weight_bytes=es, kv_bytes=es), preset)
    peak_flops, copy_bw = measured_peaks(device, eng.dtype)
    rows = [time_decode(eng, counting, hw.hbm_bytes_per_s, copy_bw, B, args.context, args.repeats)
            for B in batches]
    rows += [time_prefill(eng, counting, hw.peak_flops, peak_flops, n, max(1, args.repeats // 2))
             for n in prefills]
    head = {"model": spec.name, "device": str(device), "dtype": str(eng.dtype).replace("torch.", ""),
            "attention": eng.attn_impl, "experts": eng.expert_impl, "preset": preset,
            "datasheet_gbps": hw.hbm_bytes_per_s / 1e9, "datasheet_tflops": hw.peak_flops / 1e12,
            "measured_copy_gbps": copy_bw / 1e9, "measured_matmul_tflops": peak_flops / 1e12}
    if args.json:
        print(json.dumps({**head, "rows": rows}))
        return 0
    print(f"engine roofline: {spec.name} on {device} ({head['dtype']}, attention {eng.attn_impl}, "
          f"experts {eng.expert_impl})")
    print(f"peaks: '{preset}' preset {head['datasheet_gbps']:,.0f} GB/s, {head['datasheet_tflops']:,.1f} "
          f"TFLOP/s; measured copy {head['measured_copy_gbps']:,.1f} GB/s, matmul "
          f"{head['measured_matmul_tflops']:,.2f} TFLOP/s")
    for r in rows:
        if r["kind"] == "decode":
            print(f"decode  B={r['batch']:>4} ctx={r['context']:>6}: {r['time_ms']:9.2f} ms, must move "
                  f"{r['bytes_gb']:8.3f} GB -> {r['achieved_gbps']:9.1f} GB/s = {r['of_datasheet']:6.1%} "
                  f"of datasheet, {r['of_measured_copy']:6.1%} of measured copy")
        else:
            print(f"prefill N={r['tokens']:>6}:          {r['time_ms']:9.2f} ms, {r['tflop']:8.3f} TFLOP "
                  f"-> {r['achieved_tflops']:9.3f} TFLOP/s = {r['of_datasheet']:6.1%} of datasheet, "
                  f"{r['of_measured_matmul']:6.1%} of measured matmul")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
