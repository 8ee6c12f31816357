"""Model architectures read from a Hugging Face `config.json`.

A `ModelSpec` holds only what the cost model and the engine need: layer count, attention shape,
MLP or expert widths, sliding-window layers and the data types (with their bytes) of the weights,
the expert weights and the KV cache. Presets live as published configs in `presets/models/` and
are selected by name; any other name is read as a path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from costmodel.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets" / "models"

# Bytes per parameter. MXFP4 packs 32 4-bit values with one shared 8-bit scale: 4.25 bits.
DTYPE_BYTES = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "fp8": 1.0, "mxfp4": 4.25 / 8}

# Data types a model can be priced with (canonical names; ModelSpec holds these), keyed by the
# study key that sets them. MXFP4 is an expert-weight format only; the KV cache is bf16 or fp8.
WEIGHT_DTYPES = ("bfloat16", "fp8")
EXPERT_DTYPES = ("bfloat16", "fp8", "mxfp4")
KV_CACHE_DTYPES = ("bfloat16", "fp8")
DTYPE_CHOICES = {"dtype": WEIGHT_DTYPES, "expert_dtype": EXPERT_DTYPES,
                 "kv_cache_dtype": KV_CACHE_DTYPES}
_SPELLINGS = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp8": "fp8", "mxfp4": "mxfp4"}
_SHORT = {"bfloat16": "bf16", "fp8": "fp8", "mxfp4": "mxfp4"}
# A config.json's torch_dtype as served: 16- and 32-bit checkpoints load at 16 bits (vLLM's
# dtype "auto"), priced as bf16 (same bytes and tensor-core rate as fp16).
_CONFIG_DTYPES = {"bfloat16": "bfloat16", "float16": "bfloat16", "float32": "bfloat16"}
# Each dtype field of ModelSpec and the byte field that follows it.
_BYTES_OF = {"weight_dtype": "weight_bytes", "expert_dtype": "expert_weight_bytes",
             "kv_cache_dtype": "kv_bytes"}
_ALLOWED = {"weight_dtype": WEIGHT_DTYPES, "expert_dtype": EXPERT_DTYPES,
            "kv_cache_dtype": KV_CACHE_DTYPES}


def canonical_dtype(value: object, allowed: tuple[str, ...]) -> str:
    """The canonical name of a user's spelling (bf16, bfloat16, fp8, mxfp4) if in `allowed`.

    Raises ValueError with a one-line message the caller prefixes with the flag or key.
    """
    name = _SPELLINGS.get(value.lower()) if isinstance(value, str) else None
    if name is not None and name in allowed:
        return name
    valid = ", ".join(_SHORT[d] for d in allowed)
    if name == "mxfp4":
        raise ValueError(f"mxfp4 is an expert-weight format only (valid here: {valid})")
    raise ValueError(f"unsupported dtype {value!r} (valid: {valid}; bf16 may be written bfloat16)")


SUPPORTED_ARCHITECTURES = (
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM",
    "LlamaForCausalLM",
    "MixtralForCausalLM",
    "GptOssForCausalLM",
)

# Default routing skew (sigma of a log-normal expert popularity, see costmodel/experts.py).
# No sigma meets both published Qwen3-30B-A3B counts (top expert ~4% of the routing mass needs
# 0.77, half the experts carrying 90% needs 1.37); what pricing depends on is how many distinct
# experts a batch reads, set by the rarely used experts, and 1.2 reproduces that within +1-16%
# at 16-128 tokens (0.9 overstated it by 11-29%). 1.2 is also what AIConfigurator's "typical
# production" power law (alpha 1.2) amounts to at 64-256 tokens. Its cost: a top-expert share of
# 7% instead of 4%. Evidence: benchmarks/results/routing_skew_check.md.
DEFAULT_ROUTING_SKEW = 1.2
MAX_ROUTING_SKEW = 5.0  # beyond it one expert takes nearly all the mass; no router is that skewed


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    num_layers: int
    hidden: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    # MLP: dense models have `dense_intermediate`; MoE models have experts.
    dense_intermediate: int
    num_experts: int  # 0 for a dense model
    top_k: int
    expert_intermediate: int
    shared_expert_intermediate: int  # 0 when there is no shared expert
    sliding_window: int  # 0 when no layer slides
    sliding_layers: tuple[bool, ...]  # per layer: True where the window applies
    # Data types ("bfloat16", "fp8"; experts also "mxfp4") and the bytes per element they imply;
    # with_overrides keeps each byte field in step with its dtype field.
    weight_dtype: str  # attention, embeddings, router, dense MLP, shared expert
    expert_dtype: str  # routed experts (mxfp4 for GPT-OSS); equals weight_dtype on dense models
    kv_cache_dtype: str
    weight_bytes: float  # bytes per parameter of attention, embeddings, router
    expert_weight_bytes: float  # bytes per parameter of the experts (MXFP4 for GPT-OSS)
    kv_bytes: float  # bytes per element of the KV cache
    tie_embeddings: bool
    attention_bias: bool
    routing_skew: float
    rope_theta: float
    rms_norm_eps: float

    def __post_init__(self) -> None:
        for field, allowed in _ALLOWED.items():
            if getattr(self, field) not in allowed:
                raise ConfigError(f"ModelSpec.{field} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, field)!r}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_sliding_layers(self) -> int:
        return sum(self.sliding_layers)

    # Parameter counts (whole model, no parallelism).
    @property
    def attn_params_per_layer(self) -> int:
        return self.hidden * (2 * self.q_dim + 2 * self.kv_dim)

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (gate, up, down)."""
        return 3 * self.hidden * self.expert_intermediate

    @property
    def dense_mlp_params_per_layer(self) -> int:
        """MLP parameters every token reads: a dense MLP, or a MoE layer's router and shared expert."""
        if not self.is_moe:
            return 3 * self.hidden * self.dense_intermediate
        return self.hidden * self.num_experts + 3 * self.hidden * self.shared_expert_intermediate

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)

    @property
    def total_params(self) -> int:
        per_layer = self.attn_params_per_layer + self.dense_mlp_params_per_layer
        per_layer += self.num_experts * self.expert_params
        return self.num_layers * per_layer + self.embedding_params

    @property
    def weight_bytes_total(self) -> float:
        dense = self.num_layers * (self.attn_params_per_layer + self.dense_mlp_params_per_layer)
        experts = self.num_layers * self.num_experts * self.expert_params
        return (dense + self.embedding_params) * self.weight_bytes + experts * self.expert_weight_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """KV cache bytes one token occupies across all layers (K and V)."""
        return 2.0 * self.kv_dim * self.kv_bytes * self.num_layers

    @property
    def dtype_note(self) -> str:
        """'' when weights, experts and KV cache are all bf16, else e.g. 'fp8 weights, fp8 KV cache'."""
        parts = []
        if self.weight_dtype != "bfloat16":
            parts.append(f"{_SHORT[self.weight_dtype]} weights")
        if self.is_moe and self.expert_dtype != self.weight_dtype:
            parts.append(f"{_SHORT[self.expert_dtype]} experts")
        if self.kv_cache_dtype != "bfloat16":
            parts.append(f"{_SHORT[self.kv_cache_dtype]} KV cache")
        return ", ".join(parts)

    def with_overrides(self, **changes: Any) -> ModelSpec:
        """A copy with fields changed; a changed dtype field also sets its byte field (unless
        that is given too, as a benchmark counting bytes at the engine's own dtype does)."""
        dense = not changes.get("num_experts", self.num_experts)
        if dense and "weight_dtype" in changes and "expert_dtype" not in changes:
            changes["expert_dtype"] = changes["weight_dtype"]
        for field, nbytes in _BYTES_OF.items():
            if field in changes and nbytes not in changes:  # an unknown dtype: __post_init__ says so
                changes[nbytes] = DTYPE_BYTES.get(str(changes[field]), 0.0)
        return replace(self, **changes)


# Hugging Face ids of the presets' checkpoints (lower case; "-instruct" variants share the
# architecture). A "-FP8" suffix is the same model with fp8 weights, as the Hub publishes them.
HF_IDS = {
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b", "qwen/qwen3-235b-a22b": "qwen3-235b-a22b",
    "qwen/qwen3-8b": "qwen3-8b", "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/meta-llama-3.1-8b-instruct": "llama-3.1-8b",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b", "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
    "openai/gpt-oss-20b": "gpt-oss-20b", "openai/gpt-oss-120b": "gpt-oss-120b",
    "meta-llama/llama-3.1-70b": "llama-3.1-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
    "meta-llama/meta-llama-3.1-70b-instruct": "llama-3.1-70b", "qwen/qwen3-32b": "qwen3-32b",
}


def hf_preset(name: str) -> tuple[str | None, str | None]:
    """(preset, weight dtype the id implies) for a Hugging Face id such as Qwen/Qwen3-30B-A3B-FP8."""
    key = name.lower().rstrip("/")
    if Path(name).exists() or "/" not in key:
        return None, None
    if key.endswith("-fp8") and key.removesuffix("-fp8") in HF_IDS:
        return HF_IDS[key.removesuffix("-fp8")], "fp8"
    return HF_IDS.get(key), None


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_model(name_or_path: str | Path, *, dtype: str | None = None,
               expert_dtype: str | None = None, kv_cache_dtype: str | None = None,
               routing_skew: float | None = None) -> ModelSpec:
    """A preset name (`qwen3-30b-a3b`), a Hugging Face id of one (`Qwen/Qwen3-30B-A3B`, with
    `-FP8`: fp8 weights), or the path of a `config.json`.

    `dtype`, `expert_dtype` and `kv_cache_dtype` (any spelling `canonical_dtype` accepts) override
    what the config says; None keeps it (see `parse_config`).
    """
    preset, checkpoint_dtype = hf_preset(str(name_or_path))
    if preset is not None:
        name_or_path = preset
        dtype = dtype if dtype is not None else checkpoint_dtype
    path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(
                f"unknown model '{name_or_path}': not a preset ({', '.join(list_presets())}), "
                "a Hugging Face id of one, nor a config.json file"
            )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    name = path.stem if path.parent == PRESET_DIR else str(path)
    return parse_config(cfg, source=str(path), name=name, dtype=dtype, expert_dtype=expert_dtype,
                        kv_cache_dtype=kv_cache_dtype, routing_skew=routing_skew)


def parse_config(cfg: dict[str, Any], *, source: str, name: str, dtype: str | None = None,
                 expert_dtype: str | None = None, kv_cache_dtype: str | None = None,
                 routing_skew: float | None = None) -> ModelSpec:
    """Defaults when a dtype is None: weights at the config's `torch_dtype` (fp8 when its
    `quantization_config` says fp8); experts as the config quantizes them (mxfp4 for GPT-OSS),
    else as the weights; the KV cache bf16."""
    def need(key: str, *alts: str) -> Any:
        for k in (key, *alts):
            if cfg.get(k) is not None:
                return cfg[k]
        raise ConfigError(f"{source}: missing key '{key}'")

    def need_int(key: str, *alts: str) -> int:
        return positive_int(key, need(key, *alts))

    def positive_int(key: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{source}: key '{key}' must be a positive integer, got {value!r}")
        return value

    def optional_int(key: str, default: int) -> int:
        """The key's value if present (and valid); the architecture's default only when absent."""
        value = cfg.get(key)
        return default if value is None else positive_int(key, value)

    def optional_float(key: str, default: float) -> float:
        value = cfg.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{source}: key '{key}' must be a positive number, got {value!r}")
        return float(value)

    archs = cfg.get("architectures")
    if not archs or not isinstance(archs, list):
        raise ConfigError(f"{source}: missing key 'architectures'")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{source}: key 'architectures': unsupported architecture '{arch}' "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    hidden = need_int("hidden_size")
    num_layers = need_int("num_hidden_layers")
    num_q_heads = need_int("num_attention_heads")
    num_kv_heads = optional_int("num_key_value_heads", num_q_heads)
    if num_q_heads % num_kv_heads:
        raise ConfigError(f"{source}: key 'num_key_value_heads' ({num_kv_heads}) must divide "
                          f"num_attention_heads ({num_q_heads})")
    head_dim = optional_int("head_dim", hidden // num_q_heads)
    vocab = need_int("vocab_size")

    num_experts = top_k = expert_inter = shared_inter = dense_inter = 0
    if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
        num_experts = need_int("num_experts")
        top_k = need_int("num_experts_per_tok")
        expert_inter = need_int("moe_intermediate_size")
        # 0 or absent: no shared expert
        shared = cfg.get("shared_expert_intermediate_size")
        shared_inter = positive_int("shared_expert_intermediate_size", shared) if shared else 0
        if cfg.get("mlp_only_layers") or optional_int("decoder_sparse_step", 1) != 1:
            raise ConfigError(f"{source}: key 'mlp_only_layers'/'decoder_sparse_step': "
                              "mixed dense and MoE layers are not supported")
    elif arch in ("MixtralForCausalLM", "GptOssForCausalLM"):
        num_experts = need_int("num_local_experts")
        top_k = need_int("num_experts_per_tok", "experts_per_token")
        expert_inter = need_int("intermediate_size")
    else:
        dense_inter = need_int("intermediate_size")
    if num_experts and not 0 < top_k <= num_experts:
        raise ConfigError(f"{source}: key 'num_experts_per_tok' ({top_k}) must be in 1..{num_experts}")

    sliding_window = 0
    sliding_layers = (False,) * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ConfigError(f"{source}: key 'layer_types' must list {num_layers} layer types")
        sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
        if any(sliding_layers):
            sliding_window = need_int("sliding_window")
    elif cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        sliding_window = need_int("sliding_window")
        sliding_layers = (True,) * num_layers

    def choose(key: str, value: str | None, default: str) -> str:
        if value is None:
            return default
        try:
            return canonical_dtype(value, DTYPE_CHOICES[key])
        except ValueError as e:
            raise ConfigError(f"--{key.replace('_', '-')}: {e}") from None

    torch_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    if torch_dtype not in _CONFIG_DTYPES:
        raise ConfigError(f"{source}: key 'torch_dtype': unsupported dtype '{torch_dtype}'")
    quant = cfg.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    weight_dtype = choose("dtype", dtype, "fp8" if method == "fp8" else _CONFIG_DTYPES[torch_dtype])
    expert_dt = choose("expert_dtype", expert_dtype, "mxfp4" if method == "mxfp4" else weight_dtype)
    if not num_experts:
        if expert_dt != weight_dtype and expert_dtype is not None:
            raise ConfigError(f"--expert-dtype: {name} is a dense model, it has no experts "
                              "(use --dtype)")
        expert_dt = weight_dtype
    kv_dtype = choose("kv_cache_dtype", kv_cache_dtype, "bfloat16")

    skew = DEFAULT_ROUTING_SKEW if routing_skew is None else routing_skew
    if not 0 <= skew <= MAX_ROUTING_SKEW:  # also rejects NaN
        raise ConfigError(f"--routing-skew must be between 0 and {MAX_ROUTING_SKEW:g}, got {skew}")
    return ModelSpec(
        name=name, architecture=arch, num_layers=num_layers, hidden=hidden,
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, vocab=vocab,
        max_context=optional_int("max_position_embeddings", 1 << 30),
        dense_intermediate=dense_inter, num_experts=num_experts, top_k=top_k,
        expert_intermediate=expert_inter, shared_expert_intermediate=shared_inter,
        sliding_window=sliding_window, sliding_layers=sliding_layers,
        weight_dtype=weight_dtype, expert_dtype=expert_dt, kv_cache_dtype=kv_dtype,
        weight_bytes=DTYPE_BYTES[weight_dtype], expert_weight_bytes=DTYPE_BYTES[expert_dt],
        kv_bytes=DTYPE_BYTES[kv_dtype],
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        routing_skew=skew if num_experts else 0.0,
        rope_theta=optional_float("rope_theta", 10000.0),
        rms_norm_eps=optional_float("rms_norm_eps", 1e-6),
    )
