"""Weight, expert and KV-cache data types: bytes, KV capacity, flags, study keys and errors."""

from __future__ import annotations

import argparse
import json

import pytest

from cli.main import main
from core.admission import kv_blocks
from costmodel import ConfigError, CostModel, Parallelism, load_model, parse_config
from costmodel.model import PRESET_DIR
from sim.study import Study
from sim.study_file import make_study


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def qwen_tp2(**dtypes: str) -> CostModel:
    return CostModel(load_model("qwen3-30b-a3b", **dtypes), "h100", parallel=Parallelism(tp=2))


def test_qwen3_30b_weight_bytes_per_gpu_halve_at_fp8():
    # Qwen3-30B-A3B at TP 2: hidden 2048, 48 layers, 32 q / 4 kv heads of 128, 128 experts of
    # width 768, vocab 151936, untied embeddings. Parameters per GPU:
    attn = 2048 * (2 * 32 * 128 // 2 + 2 * 2 * 128)  # q, o split; 2 of 4 kv heads per GPU
    router = 2048 * 128 // 2
    embed = 151936 * 2048 * 2 // 2
    experts = 128 * 3 * 2048 * 768 // 2
    dense = 48 * (attn + router) + embed
    assert dense + 48 * experts == 15_265_955_840
    bf16, fp8 = qwen_tp2(), qwen_tp2(dtype="fp8")
    assert bf16.model.weight_dtype == bf16.model.expert_dtype == "bfloat16"
    assert fp8.model.weight_dtype == fp8.model.expert_dtype == "fp8"  # experts follow --dtype
    assert bf16.weight_bytes_per_gpu == pytest.approx(2 * 15_265_955_840)
    # fp8 checkpoints keep embeddings (and the LM head) in bf16: 2 bytes, the rest 1
    assert fp8.weight_bytes_per_gpu == pytest.approx(15_265_955_840 + embed)
    # fp8 attention with bf16 experts: only the dense part halves
    mixed = qwen_tp2(dtype="fp8", expert_dtype="bf16")
    assert mixed.weight_bytes_per_gpu == pytest.approx(dense + embed + 2 * 48 * experts)


def test_gpt_oss_20b_experts_mxfp4_by_default_and_bf16_on_request():
    # 24 layers x 32 experts x (gate, up, down) 3 x 2880 x 2880 parameters
    expert_params = 24 * 32 * 3 * 2880 * 2880
    assert expert_params == 19_110_297_600
    dense_bytes = CostModel(load_model("gpt-oss-20b", expert_dtype="bf16"), "h100")
    oss = load_model("gpt-oss-20b")  # per its quantization_config
    assert (oss.weight_dtype, oss.expert_dtype, oss.kv_cache_dtype) == ("bfloat16", "mxfp4", "bfloat16")
    assert oss.expert_weight_bytes == 4.25 / 8
    mx = CostModel(oss, "h100")
    # 4.25 bits per MXFP4 value: 10.15 GB of experts against 38.22 GB in bf16
    assert dense_bytes.weight_bytes_per_gpu - mx.weight_bytes_per_gpu == pytest.approx(
        expert_params * (2 - 4.25 / 8))
    assert expert_params * 4.25 / 8 == pytest.approx(10_152_345_600)
    # --dtype leaves the checkpoint's expert format alone; --expert-dtype changes it
    fp8 = load_model("gpt-oss-20b", dtype="fp8")
    assert (fp8.weight_bytes, fp8.expert_dtype) == (1.0, "mxfp4")


def test_fp8_kv_cache_holds_twice_the_tokens():
    bf16, fp8 = qwen_tp2(), qwen_tp2(kv_cache_dtype="fp8")
    assert fp8.weight_bytes_per_gpu == bf16.weight_bytes_per_gpu  # weights untouched
    # 48 layers x K and V x 2 kv heads per GPU x 128 x bytes
    assert bf16.kv_bytes_per_token_per_gpu == 48 * 2 * 2 * 128 * 2
    assert fp8.kv_bytes_per_token_per_gpu == 48 * 2 * 2 * 128 * 1
    reserve = 0.05 * bf16.hw.hbm_bytes  # what simulate() reserves for activations
    blocks16, _ = kv_blocks(bf16, 16, 0.9, reserve)
    blocks8, _ = kv_blocks(fp8, 16, 0.9, reserve)
    assert blocks16 > 1000
    assert blocks8 in (2 * blocks16, 2 * blocks16 + 1)  # floor of twice the same quotient


def test_spellings_canonical_and_bytes_follow_overrides():
    m = load_model("qwen3-30b-a3b", dtype="BF16", expert_dtype="mxfp4", kv_cache_dtype="fp8")
    assert (m.weight_dtype, m.expert_dtype, m.kv_cache_dtype) == ("bfloat16", "mxfp4", "fp8")
    assert (m.weight_bytes, m.expert_weight_bytes, m.kv_bytes) == (2.0, 4.25 / 8, 1.0)
    back = m.with_overrides(expert_dtype="bfloat16", kv_cache_dtype="bfloat16")
    assert (back.expert_weight_bytes, back.kv_bytes) == (2.0, 2.0)
    with pytest.raises(ConfigError, match="weight_dtype"):
        m.with_overrides(weight_dtype="bf16")  # ModelSpec holds canonical names only
    llama = load_model("llama-3.1-8b").with_overrides(weight_dtype="fp8")
    assert llama.expert_dtype == "fp8"  # a dense model's experts field follows its weights


def test_hf_fp8_checkpoint_defaults_to_fp8_weights():
    cfg = json.loads((PRESET_DIR / "qwen3-30b-a3b.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    m = parse_config(cfg, source="fp8.json", name="fp8")
    assert (m.weight_dtype, m.expert_dtype, m.kv_cache_dtype) == ("fp8", "fp8", "bfloat16")
    assert parse_config(cfg, source="fp8.json", name="fp8", dtype="bf16").weight_bytes == 2.0


def test_study_keys_and_flags_are_one_to_one():
    for key in ("dtype", "expert_dtype", "kv_cache_dtype"):
        assert key in Study.model_fields
    assert "mxfp4_experts" not in Study.model_fields
    values = {"dtype": "fp8", "expert_dtype": "mxfp4", "kv_cache_dtype": "fp8"}
    from cli.simulate import add_parsers, study_from_args
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    ns = parser.parse_args(["compare", "--dtype", "fp8", "--expert-dtype", "mxfp4",
                            "--kv-cache-dtype", "fp8"])
    assert study_from_args(ns) == make_study(values)
    m = make_study(values).cost_model().model
    assert (m.weight_dtype, m.expert_dtype, m.kv_cache_dtype) == ("fp8", "mxfp4", "fp8")


def test_study_file_and_flags_give_the_same_run(capsys, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("dtype: fp8\nkv_cache_dtype: bf16\nduration_s: 10\npolicies: [layered]\n")
    code, from_file, _ = run(capsys, "compare", str(study), "--json")
    assert code == 0
    code, from_flags, _ = run(capsys, "compare", "--dtype", "fp8", "--kv-cache-dtype", "bf16",
                              "--duration", "10", "--policies", "layered", "--json")
    assert code == 0 and from_file == from_flags
    code, default, _ = run(capsys, "compare", "--duration", "10", "--policies", "layered", "--json")
    assert json.loads(default)["hbm_bytes_per_request"] > json.loads(from_file)["hbm_bytes_per_request"]


def test_header_names_dtypes_only_when_not_bf16():
    assert "bf16" not in make_study({}).setup_line(make_study({}).cost_model())
    for s in ("fp8", "mxfp4", "weights", "KV"):
        assert s not in make_study({}).setup_line(make_study({}).cost_model())
    st = make_study({"dtype": "fp8", "kv_cache_dtype": "fp8"})
    assert "(tp 2, fp8 weights, fp8 KV cache, " in st.setup_line(st.cost_model())
    oss = make_study({"model": "gpt-oss-20b", "tp": 1})
    assert "(tp 1, mxfp4 experts, " in oss.setup_line(oss.cost_model())


@pytest.mark.parametrize("args,needle", [
    (["compare", "--dtype", "int4"], "--dtype: unsupported dtype 'int4' (valid: bf16, fp8"),
    (["compare", "--dtype", "mxfp4"], "--dtype: mxfp4 is an expert-weight format only"),
    (["simulate", "--expert-dtype", "fp4"],
     "--expert-dtype: unsupported dtype 'fp4' (valid: bf16, fp8, mxfp4"),
    (["capacity", "--kv-cache-dtype", "mxfp4"], "--kv-cache-dtype: mxfp4 is an expert-weight format"),
    (["explain", "--decode", "1", "--kv-cache-dtype", "fp16"], "--kv-cache-dtype: unsupported dtype 'fp16'"),
    (["explain", "--decode", "1", "--model", "llama-3.1-8b", "--expert-dtype", "fp8"], "has no experts"),
])
def test_bad_dtype_flag_is_one_line(capsys, args, needle):
    assert_one_line_error(capsys, args, needle)


def test_hugging_face_ids_resolve_to_presets() -> None:
    from costmodel import load_model

    assert load_model("Qwen/Qwen3-30B-A3B").name == "qwen3-30b-a3b"
    fp8 = load_model("Qwen/Qwen3-235B-A22B-FP8")
    assert fp8.name == "qwen3-235b-a22b" and fp8.weight_dtype == "fp8"
    assert load_model("Qwen/Qwen3-235B-A22B-FP8", dtype="bf16").weight_dtype == "bfloat16"  # flag wins
    assert load_model("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    with pytest.raises(ConfigError, match="Hugging Face id"):
        load_model("someone/unknown-model")
