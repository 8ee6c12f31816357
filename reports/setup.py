"""What produced a results folder: model, GPU, parallelism, workload, SLO, profile and version.

Read from whatever the folder records, most specific first: a resolved study file (study.yaml),
run.json (the command and version), a study or setup recorded inside capacity.json or
metrics.json, the flat keys of metrics.json, and the header of validation.json. Anything no file
records is shown as "not recorded", never guessed; only the profile label (when the folder
records the GPU and profile file but not the label) and what a study without a rate did are
resolved with layersim's own rules.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NOT_RECORDED = "not recorded"
_NESTED = ("setup", "study")  # where results files record the resolved study
_RUN_ONLY = frozenset({"duration_s", "policy", *_NESTED})
_VERSION_COMMENT = re.compile(r"^#.*\blayersim\b[^\d\n]*v?(\d+\.\d+[\w.+-]*)", re.I | re.M)


@dataclass(frozen=True)
class Setup:
    items: tuple[tuple[str, str], ...]  # (label, text) in display order
    policies: tuple[str, ...]  # the study's policy order, when recorded
    sources: tuple[str, ...]  # files the setup was read from

    def get(self, label: str) -> str:
        return dict(self.items).get(label, NOT_RECORDED)


def read_study_file(root: Path, notes: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """The study.yaml mapping and a version from its comments, or (None, None)."""
    path = root / "study.yaml"
    if not path.is_file():
        return None, None
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        notes.append(f"study.yaml: unreadable ({type(e).__name__}), skipped")
        return None, None
    if not isinstance(data, dict):
        notes.append("study.yaml: not a mapping of keys to values, skipped")
        return None, None
    m = _VERSION_COMMENT.search(text)
    return data, m.group(1) if m else None


def _with_nested(source: str, data: Mapping[str, Any], skip: frozenset[str]) -> list[
        tuple[str, Mapping[str, Any]]]:
    """The nested setup/study mappings of data, then its own keys less `skip`."""
    out: list[tuple[str, Mapping[str, Any]]] = [
        (source, data[k]) for k in _NESTED if isinstance(data.get(k), dict)]
    return out + [(source, {k: v for k, v in data.items() if k not in skip})]


def load_setup(root: Path, metrics: Sequence[Mapping[str, Any]], capacity: Any,
               validation: Mapping[str, Any] | None, notes: list[str]) -> Setup:
    study, comment_version = read_study_file(root, notes)
    layers: list[tuple[str, Mapping[str, Any]]] = []  # most specific first
    if study is not None:
        layers.append(("study.yaml", study))
    run = _read_mapping(root / "run.json", notes)
    if run is not None:
        layers += _with_nested("run.json", run, frozenset({"command", *_NESTED}))
    if isinstance(capacity, dict):
        layers += _with_nested("capacity.json", capacity, frozenset({"search", "answer", *_NESTED}))
    for m in metrics:
        layers += [("metrics.json", m[k]) for k in _NESTED if isinstance(m.get(k), dict)]
    # A run's own duration_s is how long it took, not the study's arrival window.
    layers += [("metrics.json", {k: v for k, v in m.items() if k not in _RUN_ONLY}) for m in metrics]
    if validation is not None:
        layers.append(("validation.json", _validation_keys(validation)))
    rec = _Record(layers)
    items: list[tuple[str, str]] = [
        ("Model", _model(rec)),
        ("Hardware", _hardware(rec)),
        ("Workload", _workload(rec)),
        ("SLO", _slo(rec)),
        ("Profile", _profile(rec)),
    ]
    if validation is not None:
        items.append(("Engine", _engine(validation)))
    version = rec.text("layersim_version", "version") or comment_version
    items.append(("layersim", f"version {version}" if version else NOT_RECORDED))
    return Setup(tuple(items), _policies(rec.get("policies"), validation), tuple(dict.fromkeys(rec.used)))


def _read_mapping(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        notes.append(f"{path.name}: unreadable ({type(e).__name__}), skipped")
        return None
    return data if isinstance(data, dict) else None


class _Record:
    """Looks a key up through the layers, remembering which files answered."""

    def __init__(self, layers: list[tuple[str, Mapping[str, Any]]]) -> None:
        self.layers = layers
        self.used: list[str] = []

    def has(self, key: str) -> bool:
        return any(key in layer for _, layer in self.layers)

    def get(self, *keys: str) -> Any:
        for key in keys:
            for source, layer in self.layers:
                if layer.get(key) is not None:
                    self.used.append(source)
                    return layer[key]
        return None

    def text(self, *keys: str) -> str | None:
        v = self.get(*keys)
        return None if v is None or isinstance(v, (dict, list)) else str(v)

    def num(self, *keys: str) -> float | None:
        v = self.get(*keys)
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            return None
        try:
            f = float(v)
        except ValueError:
            return None
        return f if math.isfinite(f) else None


def _validation_keys(v: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v[k] for k in ("model", "workload", "num_requests", "seed", "routing_skew") if k in v}
    if v.get("profile_gpu") is not None:
        out["gpu"] = v["profile_gpu"] if v.get("device") != "cpu" else "cpu"
    if v.get("profile") is not None:
        out["profile_label"] = v["profile"]
    return out


def _g(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 and v == int(v) else f"{v:g}"


def _model(rec: _Record) -> str:
    model = rec.text("model")
    if model is None:
        return NOT_RECORDED
    dtypes = [f"{name} {v}" for name, key in (("weights", "dtype"), ("experts", "expert_dtype"),
                                              ("KV cache", "kv_cache_dtype"))
              if (v := rec.text(key)) is not None]
    return model + (f" ({', '.join(dtypes)})" if dtypes else "")


def _hardware(rec: _Record) -> str:
    gpu = rec.text("gpu")
    tp, ep, replicas = rec.num("tp"), rec.num("ep"), rec.num("replicas")
    gpus = rec.num("gpus")
    if gpus is None and tp is not None:
        gpus = tp * (ep or 1) * (replicas or 1)
    if gpu is None and gpus is None:
        return NOT_RECORDED
    head = f"{_g(gpus)} × " if gpus is not None else ""
    head += gpu if gpu is not None else "GPU (type not recorded)"
    shape = [f"tp {_g(tp)}"] if tp is not None else []
    if ep is not None and ep > 1:
        shape.append(f"ep {_g(ep)}")
    if replicas is not None:
        router = rec.text("router")
        shape.append(f"{_g(replicas)} replica{'s' if replicas != 1 else ''}")
        if router and replicas > 1:
            shape.append(f"{router} router")
    return head + (f" ({', '.join(shape)})" if shape else "")


def _workload(rec: _Record) -> str:
    name, desc = rec.text("workload"), rec.text("workload_description")
    if name is not None and " " in name:  # validate records the workload's full description
        name, desc = None, desc or name
    if name is None and desc is None:
        return NOT_RECORDED
    bits: list[str] = []
    if desc is None:  # a description already says how requests arrived and how many
        rate = rec.num("rate")
        if rate is not None:
            bits.append(f"{rec.text('arrival') or 'Poisson'} arrivals at {_g(rate)} req/s")
        elif rec.has("rate"):  # recorded as null: the trace's own timestamps, else the default
            bits.append(_default_arrivals(name, rec.num("speed")))
        if (dur := rec.num("duration_s")) is not None:
            bits.append(f"{_g(dur)} s of arrivals")
        if (n := rec.num("num_requests")) is not None:
            bits.append(f"{_g(n)} requests")
    if (seed := rec.num("seed")) is not None:
        bits.append(f"seed {_g(seed)}")
    if name is None:
        return ", ".join([str(desc), *bits])
    return ", ".join([name, *bits]) + (f"; {desc}" if desc else "")


def _default_arrivals(workload: str | None, speed: float | None) -> str:
    """What a study without a rate does: replay a trace's own arrival times, else arrive at the
    default rate (sim/study.py). Said generically when that cannot be resolved here."""
    try:
        from sim.study import DEFAULT_RATE
        from traces import has_arrival_times

        replay = workload is not None and has_arrival_times(workload)
    except Exception:  # an older layersim, or a trace file no longer where it was
        return "no rate set (a trace's own arrivals, else the default rate)"
    if replay:
        return "the trace's own arrivals" + (f" at {_g(speed)}× speed" if speed and speed != 1 else "")
    return f"Poisson arrivals at the default {_g(DEFAULT_RATE)} req/s"


def _slo(rec: _Record) -> str:
    ttft, itl = rec.num("slo_ttft_ms"), rec.num("slo_itl_ms")
    if ttft is None and itl is None:
        return NOT_RECORDED
    parts = [f"TTFT ≤ {_g(ttft)} ms" if ttft is not None else "TTFT target not recorded",
             f"per-request P99 ITL ≤ {_g(itl)} ms" if itl is not None else "ITL target not recorded"]
    return " and ".join(parts)


def _profile(rec: _Record) -> str:
    label = rec.get("profile_label")
    prof = rec.get("profile")
    if isinstance(prof, dict):  # a recorded profile: its label and where it came from
        label = label or prof.get("label")
        prof = prof.get("file") or prof.get("path")
    where = f" ({prof})" if isinstance(prof, str) and prof else ""
    if isinstance(label, str) and label:
        return label + (where if where and str(prof) not in label else "")
    gpu = rec.text("gpu")
    if gpu is None or not rec.has("profile"):
        return f"{prof}{' (label not recorded)'}" if isinstance(prof, str) else NOT_RECORDED
    try:  # the folder says which GPU and profile file: resolve the label the run used
        from costmodel.profile import resolve_profile

        resolved = resolve_profile(gpu, prof if isinstance(prof, str) else None).label
    except Exception:  # a moved profile file, an unknown GPU: say what is recorded
        return f"{prof or gpu + ' default'} (label not resolvable)"
    if where and str(prof) in resolved:
        where = ""
    return resolved + (where or ("" if prof else f" ({gpu} default)"))


def _engine(v: Mapping[str, Any]) -> str:
    parts = [f"{label} {v[k]}" for label, k in (("device", "device"), ("dtype", "engine_dtype"),
                                                ("attention", "attention_impl"),
                                                ("experts", "expert_impl")) if v.get(k) is not None]
    return ", ".join(parts) if parts else NOT_RECORDED


def _policies(recorded: Any, validation: Mapping[str, Any] | None) -> tuple[str, ...]:
    if isinstance(recorded, str):
        recorded = [p.strip() for p in recorded.split(",")]
    if isinstance(recorded, list) and recorded:
        return tuple(str(p) for p in recorded if str(p).strip())
    if validation is not None and isinstance(validation.get("runs"), dict):
        return tuple(validation["runs"])  # validate writes them in the order it ran them
    return ()


def setup_html(setup: Setup) -> str:
    missing = ' class="missing"'
    rows = "".join(
        f"<dt>{html.escape(label)}</dt><dd{missing if text == NOT_RECORDED else ''}>"
        f"{html.escape(text)}</dd>" for label, text in setup.items)
    src = (f"Read from {', '.join(setup.sources)}." if setup.sources
           else "Nothing in the results folder records the setup.")
    return (f'<section id="setup"><h2>Setup</h2><dl class="setup">{rows}</dl>'
            f'<p class="src">{html.escape(src)}</p></section>')
