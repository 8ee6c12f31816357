"""The profiles shipped for h100, h200 and a100: fitted to measured kernel tables, held to the
issue's targets, and pricing a real decoder layer as the measured rows add up."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from costmodel import CostModel, Parallelism, load_model, resolve_profile
from costmodel.measured import moe_distribution
from costmodel.profile import SHIPPED_DIR

GPU_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "gpu-data"
KERNELS = GPU_DATA / "kernels"
needs_data = pytest.mark.skipif(not KERNELS.is_dir(), reason=f"no measured tables at {GPU_DATA}")
CLASSES = ("dense_gemm", "expert_gemm", "prefill_attn", "decode_attn", "allreduce", "alltoall")
TARGET_MEDIAN, TARGET_P90 = 0.05, 0.15
# Measured misses, kept visible: on A100 (vLLM 0.14, FA2) a few shapes break the smooth trend
# their neighbours follow (GEMM tile changes at n = 768/1536; FA2 split-KV at 2-4 heads).
A100_MISSES = {"dense_gemm": "p90 16.7%", "expert_gemm": "p90 19.1%", "decode_attn": "p90 15.7%"}


def _cases() -> list[object]:
    out: list[object] = []
    for gpu in ("h100", "h200", "a100"):
        for cls in CLASSES:
            miss = A100_MISSES.get(cls) if gpu == "a100" else None
            marks = [pytest.mark.xfail(strict=True, reason=f"a100 {cls}: held-out {miss}")] if miss else []
            out.append(pytest.param(gpu, cls, marks=marks, id=f"{gpu}-{cls}"))
    return out


@pytest.mark.parametrize(("gpu", "cls"), _cases())
def test_held_out_error_within_targets(gpu: str, cls: str) -> None:
    errors = resolve_profile(gpu).fit_errors[cls]
    assert errors["held_out_rows"] > 20
    assert errors["median_rel_err"] <= TARGET_MEDIAN
    assert errors["p90_rel_err"] <= TARGET_P90


@pytest.mark.parametrize("gpu", ["h100", "h200", "a100"])
def test_shipped_profile_says_where_it_came_from(gpu: str) -> None:
    prof = resolve_profile(gpu)
    assert set(prof.tables) == set(CLASSES)
    assert prof.provenance["date"] and "Apache-2.0" in prof.provenance["license"]
    assert prof.label.startswith("measured-kernel profile (")
    for table in prof.tables.values():
        for src in table["source"]["tables"]:
            assert src["file"].startswith(f"{gpu}_sxm/") and src["version"]
    assert "NVML" in prof.fit_errors["energy"]["source"] or gpu == "a100"
    assert (SHIPPED_DIR / "NOTICE").is_file() and (SHIPPED_DIR / "LICENSE-aiconfigurator").is_file()


def test_datasheet_profile_stays_available_and_b200_is_datasheet() -> None:
    assert resolve_profile("h100", "datasheet").label == "datasheet profile"
    assert not resolve_profile("h100", "datasheet").tables
    assert resolve_profile("b200").label == "datasheet profile"


@needs_data
def test_recorded_errors_are_what_the_tables_give() -> None:
    """The shipped numbers are reproducible from the tables, not typed in."""
    from calibrate.tables import profile_from_tables

    fresh = profile_from_tables(KERNELS, "h100")
    shipped = resolve_profile("h100")
    for cls in CLASSES:
        assert fresh.fit_errors[cls] == pytest.approx(shipped.fit_errors[cls])
    assert fresh.tables["dense_gemm"]["roofline"] == shipped.tables["dense_gemm"]["roofline"]


@needs_data
@pytest.mark.parametrize("tokens", [1, 32, 512, 4096])
def test_qwen3_layer_at_tp2_matches_the_sum_of_its_measured_kernels(tokens: int) -> None:
    """One decoder layer of Qwen3-30B-A3B at TP 2 on H100 against the raw rows of its kernels:
    qkv, o_proj and router GEMMs, the fused MoE, prefill attention and two all-reduces."""
    import pandas as pd

    h100 = KERNELS / "h100_sxm"
    model = load_model("qwen3-30b-a3b")
    cm = CostModel(model, "h100", resolve_profile("h100"), Parallelism(tp=2))
    g = pd.read_parquet(h100 / "gemm/vllm/0.24.0/gemm_perf.parquet")
    g = g[(g.gemm_dtype == "bfloat16") & (g.m == tokens)]

    def gemm(n: int, k: int) -> float:
        return float(g[(g.n == n) & (g.k == k)].latency.item())

    m = pd.read_parquet(h100 / "moe/vllm/0.24.0/moe_perf.parquet")
    moe = m[(m.moe_dtype == "bfloat16") & (m.hidden_size == 2048) & (m.inter_size == 768)
            & (m.num_experts == 128) & (m.topk == 8) & (m.moe_tp_size == 2) & (m.moe_ep_size == 1)
            & (m.distribution == moe_distribution(model.routing_skew, 128, 8)) & (m.num_tokens == tokens)]
    a = pd.read_parquet(h100 / "attention/vllm/0.24.0/context_attention_perf.parquet")
    attn = a[(a.kv_cache_dtype == "bfloat16") & (a.window_size == 0) & (a.batch_size == 1)
             & (a.isl == tokens) & (a.num_heads == 16) & (a.num_key_value_heads == 2)
             & (a.head_dim == 128) & (a.kernel_source != "vllm_flash_attn_fa4")]
    n = pd.read_parquet(h100 / "comm/nccl/2.29.2/nccl_perf.parquet")
    c = pd.read_parquet(h100 / "comm/vllm/0.24.0/custom_allreduce_perf.parquet")
    msg = tokens * 2048  # the tables' message_size counts 2-byte elements (calibrate/tables.py)
    allreduce = min(
        float(n[(n.op_name == "all_reduce") & (n.nccl_dtype == "half") & (n.num_gpus == 2)
                & (n.message_size == msg)].latency.item()),
        float(c[(c.backend == "vllm_graph") & (c.num_gpus == 2) & (c.message_size == msg)].latency.item()))
    measured_s = (gemm(2560, 2048) + gemm(2048, 2048) + gemm(128, 2048) + float(moe.latency.item())
                  + float(attn.latency.item()) + 2 * allreduce) / 1e3
    mk = cm.measured
    assert mk is not None
    priced_s = mk.layer_time_s(tokens) + mk.prefill_attn_s(1, tokens * (tokens + 1) / 2)
    assert priced_s == pytest.approx(measured_s, rel=0.10)


def test_compare_without_arguments_names_the_measured_h100_profile(
        capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["compare", "--duration", "5"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("qwen3-30b-a3b on 2 x h100 (tp 2, measured-kernel profile (")
    assert "vllm 0.24.0" in header
    assert main(["compare", "--duration", "5", "--profile", "datasheet"]) == 0
    assert "datasheet profile" in capsys.readouterr().out.splitlines()[0]


def test_explain_says_what_priced_each_operation(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    assert main(["explain", "--tp", "2", "--decode", "8", "--context", "1000", "--prefill", "256"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
            if len(line.split()) > 2 and line.split()[1] in ("dense_gemm", "expert_gemm", "elementwise")}
    assert rows["experts"].split()[-3] == "table"
    assert "datasheet roofline" in rows["norms_elementwise"]  # no table measures it: says so
    assert "extrapolated" in rows["lm_head"]  # vocab / 2 = 75,968 > the widest measured n


@needs_data
def test_fp8_weights_take_the_fp8_rows() -> None:
    """An fp8 model is priced from the fp8 rows (here slower than bf16 at this shape: vLLM's
    per-tensor fp8 GEMM quantises its input first), its router from the bf16 rows."""
    prof = resolve_profile("h100")
    bf16 = CostModel(load_model("qwen3-30b-a3b"), "h100", prof, Parallelism(tp=2)).measured
    fp8 = CostModel(load_model("qwen3-30b-a3b", dtype="fp8"), "h100", prof, Parallelism(tp=2)).measured
    assert bf16 is not None and fp8 is not None
    assert fp8.sources["qkv_proj"] == "table" and fp8.sources["experts"] == "table"
    # the rows themselves (H100, vLLM 0.24.0, m 4096, n 2560, k 2048): bf16 0.0582 ms, fp8 0.0615 ms
    assert bf16.layer_ops(4096)["qkv_proj"] == pytest.approx(0.0582e-3, rel=0.01)
    assert fp8.layer_ops(4096)["qkv_proj"] == pytest.approx(0.0615e-3, rel=0.01)
    assert fp8.layer_ops(4096)["router"] == pytest.approx(bf16.layer_ops(4096)["router"])
    # fp8 experts are the block-scaled rows (Qwen3-FP8's recipe), not the per-tensor ones
    m = pd.read_parquet(KERNELS / "h100_sxm/moe/vllm/0.24.0/moe_perf.parquet")
    row = m[(m.moe_dtype == "fp8_block") & (m.hidden_size == 2048) & (m.inter_size == 768)
            & (m.num_experts == 128) & (m.moe_tp_size == 2) & (m.moe_ep_size == 1)
            & (m.distribution == "power_law_1.2") & (m.num_tokens == 64)]
    assert fp8.layer_ops(64)["experts"] == pytest.approx(float(row.latency.item()) / 1e3, rel=0.01)


def test_routing_skew_picks_the_nearest_measured_popularity() -> None:
    # sigma equivalent at 128 tokens, Qwen3 (128 experts, top-8): alpha 1.01 -> 1.09, 1.2 -> 1.24
    assert moe_distribution(0.0, 128, 8) == "balanced"
    assert moe_distribution(1.0, 128, 8) == "power_law_1.01"
    assert moe_distribution(1.2, 128, 8) == "power_law_1.2"
    assert moe_distribution(1.2, 0, 0) == "balanced"  # dense: nothing to route


def test_explain_marks_sizes_beyond_the_tables_as_extrapolated(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    def sources(*args: str) -> dict[str, str]:
        assert main(["explain", "--tp", "2", *args]) == 0
        return {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
                if len(line.split()) > 2 and line.split()[1] in ("dense_gemm", "expert_gemm")}

    assert "table" in sources("--prefill", "512")["qkv_proj"]
    # 40,000 tokens: past the GEMM tables' largest m (32,768) and the MoE tables' (16,384)
    wide = sources("--prefill", "40000")
    assert "extrapolated" in wide["qkv_proj"] and "extrapolated" in wide["experts"]


@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_engine_overhead_is_fitted_and_says_on_what(gpu: str) -> None:
    prof = resolve_profile(gpu)
    fitted = prof.fit_errors["engine_overhead"]
    assert prof.iteration_overhead_s > 0 and prof.request_overhead_s > 0
    assert fitted["fit"]["models"] == ["meta-llama/Llama-3.1-70B"] and fitted["fit"]["rows"] > 20
    assert "meta-llama/Llama-3.1-70B" not in fitted["held_out"]["models"]  # split by model
    assert "fitted" in prof.provenance["iteration_overhead_s"]
    assert (gpu == "h100") == ("transferred_from" not in fitted)


def test_a_profile_file_is_read_once_while_unchanged(tmp_path) -> None:
    """A replay or a search resolves the same --profile file for every study: one copy, not one
    per study (each lived on in reference cycles: 4.3 GB for 45 replayed runs), and a new one
    once the file changes."""
    from costmodel import default_profile, load_gpu, resolve_profile, save_profile

    path = tmp_path / "p.json"
    save_profile(default_profile(load_gpu("h100")), path)
    first = resolve_profile("h100", str(path))
    assert resolve_profile("h100", path) is first
    # rewritten at the same size and mtime (within a coarse file system's granularity)
    import os

    before = path.stat()
    base = default_profile(load_gpu("h100"))
    a = base.model_copy(update={"iteration_overhead_s": 0.25})
    b = base.model_copy(update={"iteration_overhead_s": 0.75})
    save_profile(a, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert resolve_profile("h100", path).iteration_overhead_s == 0.25
    size_a = path.stat().st_size
    save_profile(b, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == size_a
    again = resolve_profile("h100", path)
    assert again is not first and again.iteration_overhead_s == 0.75
