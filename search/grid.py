"""The search grid: a study file's `search:` mapping, its expansion, and pruning with reasons.

A search study file is a study file (every key of `layersim compare`) plus one key, `search:`,
a mapping. Its axis keys (AXES) take lists; a configuration is one value of each axis, and the
grid is their Cartesian product in the order written (axis by axis, as itertools.product).
An axis not listed under `search:` has one value: the study's own key (`policies`, already a
list at the top level, is an axis whether or not `search:` repeats it). The other keys of
`search:` (SearchSpec) set how the search runs. Flags of the same names override the file.

Pruning happens before anything is simulated: each configuration is made a Study (every key
checked as the study file would be), its cost model is built (tensor and expert parallelism
must divide the model, the weights must fit the GPU) and its policy is made; the first
ConfigError is the configuration's reason, reported beside the results, never an abort.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

from costmodel.errors import ConfigError
from costmodel.price import CostModel
from policies.registry import make_policy
from search.files import MAX_SEEDS
from sim.study import Study
from sim.study_file import make_study

# Grid axes: study keys that may take a list under `search:`.
AXES = ("gpu", "tp", "ep", "replicas", "policies", "max_num_seqs", "dtype", "expert_dtype",
        "kv_cache_dtype", "decode_tp")
MAX_CONFIGS = 10_000  # each is a bisection of tens of simulations


class SearchSpec(BaseModel):
    """The `search:` mapping (and the `search` command's flags of the same names)."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    gpu: list[str] | None = Field(default=None, min_length=1)
    tp: list[PositiveInt] | None = Field(default=None, min_length=1)
    ep: list[PositiveInt] | None = Field(default=None, min_length=1)
    replicas: list[PositiveInt] | None = Field(default=None, min_length=1)
    policies: list[str] | None = Field(default=None, min_length=1)
    max_num_seqs: list[PositiveInt | None] | None = Field(default=None, min_length=1)
    dtype: list[str | None] | None = Field(default=None, min_length=1)
    expert_dtype: list[str | None] | None = Field(default=None, min_length=1)
    kv_cache_dtype: list[str | None] | None = Field(default=None, min_length=1)
    decode_tp: list[PositiveInt | None] | None = Field(default=None, min_length=1)  # split_pools
    # a profile file per GPU type (absent: the one shipped for it, as --profile null)
    profile: dict[str, str] | None = None
    # dollars per GPU-hour per GPU type (a number: every type); absent: the study's
    # price_per_gpu_hour for every type, else no cost (ranked by GPUs instead)
    price_per_gpu_hour: dict[str, NonNegativeFloat] | NonNegativeFloat | None = None
    target_rate: float | None = Field(default=None, gt=0, le=1e9)  # total req/s to size for
    seeds: int = Field(default=1, ge=1, le=MAX_SEEDS)
    confidence: float = Field(default=0.9, gt=0, lt=1)
    rel_tol: float = Field(default=0.05, gt=0, lt=1)  # bisection stops within this of a miss
    max_probes: int = Field(default=12, ge=1, le=100)  # per configuration and seed
    jobs: int | None = Field(default=None, ge=0, le=4096)  # pool processes (0: in this process)
    ray: bool = False
    ray_address: str | None = None
    store: str | None = None  # probe store folder (default: ~/.cache/layersim/probes)

    @field_validator("gpu", mode="before")
    @classmethod
    def _lower_gpus(cls, value: Any) -> Any:
        """GPU types as costmodel.gpu names them (lower case): H100 is h100."""
        if isinstance(value, list):
            return [v.lower() if isinstance(v, str) else v for v in value]
        return value

    @field_validator("profile", "price_per_gpu_hour", mode="before")
    @classmethod
    def _lower_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            keys = [k.lower() if isinstance(k, str) else k for k in value]
            if len(set(keys)) != len(keys):
                raise ValueError("a GPU type given twice")
            return dict(zip(keys, value.values(), strict=True))
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ValueError("a price must be >= 0")  # before the union's own dict message
        return value

    def price(self, gpu: str, study: Study) -> float | None:
        p = self.price_per_gpu_hour
        if isinstance(p, dict):
            return p.get(gpu.lower())
        return p if p is not None else study.price_per_gpu_hour


# The `search:` keys that are not axes (each is also a flag of the search command)
SETTINGS = tuple(k for k in SearchSpec.model_fields if k not in AXES)


@dataclass(frozen=True)
class Config:
    """One configuration: the study it runs (one policy; rate and seed set per probe)."""
    label: str
    study: Study
    values: dict[str, Any]  # axis -> value, as the grid gave it


@dataclass(frozen=True)
class Pruned:
    label: str
    values: dict[str, Any]
    reason: str


def make_spec(values: dict[str, Any], source: str) -> SearchSpec:
    """A SearchSpec, or a one-line ConfigError naming the key (`source: key 'search.KEY'`)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: key 'search' is a mapping of grid axes and settings")
    try:
        return SearchSpec.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        # pydantic names a union's member in the location (dict[str,float]): not a key
        key = ".".join(str(p) for p in err["loc"] if "[" not in str(p)) or "search"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (valid keys: {', '.join(SearchSpec.model_fields)})"
        if source == "flags":
            raise ConfigError(f"--{key.split('.')[0].replace('_', '-')}: {msg}") from None
        raise ConfigError(f"{source}: key 'search.{key}': {msg}") from None


def axis_values(spec: SearchSpec, base: Study) -> dict[str, list[Any]]:
    """Each axis's values: the grid's list, else the study's own value (policies: its list)."""
    out: dict[str, list[Any]] = {}
    for axis in AXES:
        given = getattr(spec, axis)
        if given is None and axis == "gpu":  # named as it resolves: the profile's, else h100
            given = [base.gpu or base.resolved_profile().gpu]
        elif given is None:
            given = list(base.policies) if axis == "policies" else [getattr(base, axis)]
        dupes = sorted({str(v) for v in given if given.count(v) > 1})
        if dupes:
            raise ConfigError(f"search.{axis}: listed twice: {', '.join(dupes)}")
        out[axis] = list(given)
    return out


def label(values: dict[str, Any]) -> str:
    """'h200 tp2 ep2 x4 layered:8 seqs128 fp8 experts-mxfp4 kv-fp8': defaults left out."""
    parts = [str(values["gpu"] or "gpu?"), f"tp{values['tp']}"]
    if values["ep"] != 1:
        parts.append(f"ep{values['ep']}")
    if values["replicas"] != 1:
        parts.append(f"x{values['replicas']}")
    parts.append(values["policies"])
    if values["max_num_seqs"] is not None:
        parts.append(f"seqs{values['max_num_seqs']}")
    for key, prefix in (("dtype", ""), ("expert_dtype", "experts-"), ("kv_cache_dtype", "kv-")):
        if values[key] is not None:  # given: named, even when it is the model's default
            parts.append(f"{prefix}{values[key]}")
    if values.get("decode_tp") is not None:
        parts.append(f"decode-tp{values['decode_tp']}")
    return " ".join(parts)


def expand(spec: SearchSpec, base: Study) -> tuple[list[Config], list[Pruned]]:
    """Every configuration of the grid in order, split into those that run and those pruned."""
    axes = axis_values(spec, base)
    total = 1
    for vals in axes.values():
        total *= len(vals)
    if total > MAX_CONFIGS:
        raise ConfigError(f"search: the grid has {total:,} configurations, at most "
                          f"{MAX_CONFIGS:,} (each is a bisection of simulations)")
    configs: list[Config] = []
    pruned: list[Pruned] = []
    seen: set[str] = set()
    same: dict[str, str] = {}  # decode tp given as tp, or as null (tp): one configuration
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        name = label(values)
        if name in seen:  # e.g. dtype null and its resolved value: the same study twice
            raise ConfigError(f"search: two configurations are both '{name}'")
        seen.add(name)
        plain = label({**values, "decode_tp": None if values["decode_tp"] == values["tp"]
                       else values["decode_tp"]})
        if plain in same:
            pruned.append(Pruned(name, values, f"the same configuration as '{same[plain]}' "
                                 "(decode tp = tp)"))
            continue
        same[plain] = name
        try:
            configs.append(Config(name, _study(spec, base, values), values))
        except ConfigError as e:
            pruned.append(Pruned(name, values, str(e)))
    return configs, pruned


def _study(spec: SearchSpec, base: Study, values: dict[str, Any]) -> Study:
    """The configuration's study, checked: raises ConfigError with the reason it cannot run."""
    changes = {**values, "policies": [values["policies"]]}
    gpu = values["gpu"] or "h100"
    if spec.profile is not None:
        changes["profile"] = spec.profile.get(gpu, base.profile)
    study = make_study({**base.model_dump(), **changes}, source=f"configuration {label(values)}")
    study.refuse_disaggregated("search")
    cm = study.cost_model()  # tp/ep divide the model, the weights fit
    make_policy(values["policies"], max_num_seqs=study.max_num_seqs)
    _check_kv(cm, study)
    if study.split_pools and study.decode_tp not in (None, study.tp):  # the decode workers' too
        try:
            _check_kv(study.decode_cost_model(), study)
        except ConfigError as e:  # _check_kv's own: the decode workers'
            raise ConfigError(str(e).replace("tp=", "decode tp=", 1)) from None
    return study


def _check_kv(cm: CostModel, study: Study) -> None:
    """The weights fit, but a KV cache for at least one block must fit beside them."""
    free = cm.hw.hbm_bytes * study.gpu_memory_utilization - cm.weight_bytes_per_gpu
    if free < cm.kv_bytes_per_token_per_gpu * study.block_size:
        raise ConfigError(f"{cm.model.name} leaves no room for a KV cache on {cm.hw.name} with "
                          f"tp={cm.parallel.tp} ep={cm.parallel.ep} at gpu_memory_utilization "
                          f"{study.gpu_memory_utilization:g}")


def read_search(path: str | Path | None, flags: dict[str, Any], grid_flags: dict[str, Any]
                ) -> tuple[Study, SearchSpec]:
    """The base study (the file's keys but `search`, flags winning) and the search spec (the
    file's `search:` mapping, grid flags winning)."""
    from search.files import read_with_extras

    base, extras = read_with_extras(path, ("search",), flags)
    base.refuse_disaggregated("search")
    raw = extras.get("search") or {}
    source = str(path) if path is not None else "flags"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: key 'search' is a mapping of grid axes and settings")
    if base.rate is not None:
        where = "--rate" if "rate" in flags else f"{source}: key 'rate'"
        raise ConfigError(f"{where}: a search chooses the rate of each probe; give "
                          "search.target_rate (--target-rate) for the total rate to size for")
    if base.max_concurrency is not None:  # the clients, not the probe's rate, would set the load
        at = "--max-concurrency" if "max_concurrency" in flags else f"{source}: key 'max_concurrency'"
        raise ConfigError(f"{at}: a search probes offered rates, which closed-loop clients would "
                          "cap; leave it out (compare runs a closed loop)")
    spec = make_spec(raw, source)  # the file's mistakes named as its keys, then the flags'
    if grid_flags:
        spec = make_spec({**raw, **grid_flags}, "flags")
    _check_split(base, spec, source, flags)
    _check_prices(base, spec, "flags" if "price_per_gpu_hour" in grid_flags else source)
    return base, spec


def _check_prices(base: Study, spec: SearchSpec, source: str) -> None:
    """A price per GPU type covers the grid's GPU types (one missing would leave its
    configurations unpriced) and names only known ones (a misspelt one would price nothing);
    prices of known GPUs outside the grid are a price list's and stay unused."""
    prices = spec.price_per_gpu_hour
    if not isinstance(prices, dict):
        return
    gpus = set(spec.gpu) if spec.gpu else {(base.gpu or base.resolved_profile().gpu).lower()}
    where = f"{source}: key 'search.price_per_gpu_hour'" if source != "flags" else "--price-per-gpu-hour"
    from costmodel.gpu import GPUS

    unknown, missing = sorted(set(prices) - set(GPUS) - gpus), sorted(gpus - set(prices))
    if unknown:
        raise ConfigError(f"{where}: no GPU type {', '.join(unknown)} (known: {', '.join(GPUS)})")
    if missing:
        raise ConfigError(f"{where}: no price for {', '.join(missing)}")


def _check_split(base: Study, spec: SearchSpec, source: str, flags: dict[str, Any]) -> None:
    """split_pools searches each configuration's cheapest prefill/decode split at the target
    rate (sim/split.py): it needs that rate, and the split replaces the replica count."""
    where = "--split-pools" if "split_pools" in flags else f"{source}: key 'split_pools'"
    if not base.split_pools:
        if spec.decode_tp is not None:
            raise ConfigError("search.decode_tp: the decode workers' TP is an axis of a "
                              "split_pools search only")
        return
    if spec.target_rate is None:
        raise ConfigError(f"{where}: a split search sizes both pools for a total rate; give "
                          "search.target_rate (--target-rate)")
    if spec.replicas is not None or base.replicas != 1:
        raise ConfigError(f"{where}: the pools' sizes are searched; leave out replicas")
    steer = [f"search.{k}" for k in sorted(spec.model_fields_set & {"rel_tol", "max_probes"})]
    if base.start_rate != Study.model_fields["start_rate"].default:
        steer.append("start_rate")
    for key in steer:  # it steers the rate bisection, which a split search does not run
        raise ConfigError(f"{where}: {key} steers the rate bisection, which a split search does "
                          "not run; leave it out")
