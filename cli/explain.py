"""`layersim explain`: one iteration's per-operation cost table, LLM-Viewer style."""

from __future__ import annotations

import argparse

from costmodel import ConfigError, CostModel, Parallelism, Tile, decode_tile, load_model, resolve_profile
from traces._checks import MAX_TOKENS

# One tile is priced per decode: more running decodes than any engine batches (vLLM's
# max_num_seqs defaults to 256) would take minutes and gigabytes to price one iteration.
MAX_DECODES = 65_536


def _add_dtypes(p: argparse.ArgumentParser) -> None:
    """The dtype flags; values are checked where they are used."""
    p.add_argument("--dtype", help="bf16 | fp8: weights (default: the model's config.json)")
    p.add_argument("--expert-dtype", help="bf16 | fp8 | mxfp4: expert weights (default: the "
                   "checkpoint's expert format, mxfp4 for gpt-oss, else --dtype)")
    p.add_argument("--kv-cache-dtype", help="bf16 | fp8 (default: bf16)")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("explain", help="price one iteration and show where its time goes",
                       allow_abbrev=False)
    p.add_argument("--model", default="qwen3-30b-a3b", help="preset, Hugging Face id or config.json "
                   "path (default: qwen3-30b-a3b)")
    p.add_argument("--gpu", default=None, help="a100 | h100 | h200 | b200 | cpu (default: the "
                   "profile's GPU, else h100)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs (default: 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel groups (default: 1)")
    p.add_argument("--decode", type=int, default=0, help="running decodes in the batch (default: 0)")
    p.add_argument("--context", type=int, default=1024, help="context tokens of each decode "
                   "(default: 1024)")
    p.add_argument("--prefill", type=int, default=0, help="prompt tokens in one prefill tile "
                   "(default: 0)")
    p.add_argument("--prefill-context", type=int, default=0, help="tokens of that prompt already "
                   "cached (default: 0)")
    p.add_argument("--prefill-layers", default=None, metavar="L0:L1", help="layer range of the "
                   "prefill tile (default: all layers)")
    p.add_argument("--profile", default=None, help="a profile file, or 'datasheet' (default: the "
                   "one shipped for the GPU)")
    p.add_argument("--routing-skew", type=float, default=None, help="sigma of expert popularity "
                   "(default: 1.2 for MoE models)")
    _add_dtypes(p)
    p.add_argument("--json", action="store_true", help="print the IterationCost as one JSON object")
    p.set_defaults(handler=run)


def _layers(text: str | None, num_layers: int) -> tuple[int, int]:
    if text is None:
        return 0, num_layers
    try:
        l0, l1 = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--prefill-layers '{text}': write L0:L1, e.g. 0:3") from None
    if not 0 <= l0 < l1 <= num_layers:
        raise ConfigError(f"--prefill-layers {text}: must satisfy 0 <= L0 < L1 <= {num_layers}")
    return l0, l1


def _check_flags(ns: argparse.Namespace) -> None:
    """Bounds and emptiness before anything is loaded or priced (see MAX_DECODES)."""
    for flag in ("model", "gpu", "profile", "dtype", "expert_dtype", "kv_cache_dtype",
                 "prefill_layers"):
        value = getattr(ns, flag)
        if value is not None and not value.strip():
            raise ConfigError(f"--{flag.replace('_', '-')}: empty; give a value or leave the flag "
                              "out for its default")
    for flag, v, most in (("--decode", ns.decode, MAX_DECODES), ("--context", ns.context, MAX_TOKENS),
                          ("--prefill", ns.prefill, MAX_TOKENS),
                          ("--prefill-context", ns.prefill_context, MAX_TOKENS)):
        if not 0 <= v <= most:
            raise ConfigError(f"{flag} must be from 0 to {most:,}" + (
                " (one tile is priced per decode)" if flag == "--decode" else " tokens"))
    if ns.decode == 0 and ns.prefill == 0:
        raise ConfigError("nothing to price: give --decode N and/or --prefill N")
    if ns.prefill == 0 and (ns.prefill_context or ns.prefill_layers is not None):
        raise ConfigError("--prefill-context and --prefill-layers describe a prefill tile: give "
                          "--prefill N")


def run(ns: argparse.Namespace) -> int:
    _check_flags(ns)
    model = load_model(ns.model, dtype=ns.dtype, expert_dtype=ns.expert_dtype,
                       kv_cache_dtype=ns.kv_cache_dtype, routing_skew=ns.routing_skew)
    prof = resolve_profile(ns.gpu or "h100", ns.profile)
    if ns.gpu and ns.profile and prof.gpu != ns.gpu.lower():
        raise ConfigError(f"--gpu {ns.gpu} but the profile {ns.profile} is for '{prof.gpu}'")
    cm = CostModel(model, prof.gpu, prof, Parallelism(ns.tp, ns.ep))
    L = model.num_layers
    plan = [decode_tile(i, ns.context, L) for i in range(ns.decode)]
    if ns.prefill:
        l0, l1 = _layers(ns.prefill_layers, L)
        c = ns.prefill_context
        plan.append(Tile(ns.decode, c, c + ns.prefill, l0, l1, c, l1 == L))
    cost = cm.price(plan)
    if ns.json:
        print(cost.to_json())
        return 0
    desc = f"{ns.decode} decodes at {ns.context} context"
    if ns.prefill:
        desc += f" + prefill of {ns.prefill} tokens on layers {l0}:{l1}"
    print(f"{model.name} on {cm.parallel.num_gpus} x {cm.hw.name} (tp {ns.tp}, ep {ns.ep}); {desc}")
    print(f"profile: {prof.label}; figures per GPU")
    if cm.measured is not None:
        print("priced by: table = a measured row of this shape; interpolated / extrapolated = the "
              "tables' measured-to-roofline ratio between / beyond measured shapes; fitted roofline "
              "= no row has this shape; datasheet roofline = no table measures this class (a guess)")
    print()
    by = "priced by" if cm.measured is not None else "bound"
    width = 20 if cm.measured is not None else 10
    head = (f"{'operation':<18}{'class':<14}{'GFLOP':>10}{'HBM MB':>11}{'link MB':>10}"
            f"{by:>{width}}{'time us':>11}{'share':>8}")
    print(head)
    print("-" * len(head))
    kernels = [op for op in cost.ops if op.op_class != "host"]
    for op in kernels:
        print(f"{op.name:<18}{op.op_class:<14}{op.flops / 1e9:>10.2f}{op.hbm_bytes / 1e6:>11.1f}"
              f"{op.link_bytes / 1e6:>10.1f}{op.bound:>{width}}{op.time_s * 1e6:>11.1f}"
              f"{op.time_s / cost.latency_s:>8.1%}")
    # Host time the kernels do not see: once per iteration plus once per layer that has work
    # (the cost model's `host_overhead` row, when the profile has one).
    per_iter, per_layer = cm.profile.iteration_overhead_s, cm.profile.layer_overhead_s
    layer_host = sum(op.time_s for op in cost.ops if op.op_class == "host")
    active = round(layer_host / per_layer) if per_layer else 0
    per_request = cm.profile.request_overhead_s
    over = per_iter + layer_host + per_request * len(plan)
    guess = "guess" in str(cm.profile.provenance.get("iteration_overhead_s", ""))
    label = "host overhead (guess)" if guess else "engine overhead" if per_request else "host overhead"
    print(f"{label:<22}{'':<10}{'':>10}{'':>11}{'':>10}{'':>{width}}{over * 1e6:>11.1f}"
          f"{over / cost.latency_s:>8.1%}")
    if per_layer:
        print(f"{'':<18}iteration {per_iter * 1e6:.1f} us + {per_layer * 1e6:.1f} us x {active} "
              f"active layers")
    if per_request:
        print(f"{'':<18}iteration {per_iter * 1e6:.1f} us + {per_request * 1e6:.1f} us x "
              f"{len(plan)} requests (fitted to measured serving runs)")
    print("-" * len(head))
    hb = cost.hbm_bytes
    print(f"latency {cost.latency_s * 1e3:.3f} ms   energy {cost.energy_j:.3f} J   "
          f"{cost.flops / 1e12:.2f} TFLOP   HBM {hb.total / 1e9:.2f} GB (replica)")
    print(f"HBM by kind (GB): dense weights {hb.dense_weights / 1e9:.2f}, expert weights "
          f"{hb.expert_weights / 1e9:.2f}, KV read {hb.kv_read / 1e9:.2f}, KV write "
          f"{hb.kv_write / 1e9:.3f}, activations {hb.activations / 1e9:.2f}")
    if cost.experts_touched_per_layer:
        touched = [x for x in cost.experts_touched_per_layer if x]
        print(f"experts touched per active layer: {sum(touched) / len(touched):.1f} of "
              f"{model.num_experts} (expected, routing skew {model.routing_skew})")
    print(prof.accuracy_line())
    return 0
