"""Policies by name (`chunked:512`, `layered`, `layered:16`, `prefill-first`, `hybrid`,
`adaptive:100`) or a user's class (`path/to/file.py:ClassName` or `package.module:ClassName`).

A user's class is instantiated with no arguments (or with the text after a second colon as
one string argument) and must satisfy `policies.base.Policy`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from costmodel.errors import ConfigError
from policies.base import Policy
from policies.chunked import ChunkedPrefill
from policies.layered import LayeredPrefill
from policies.prefill_first import PrefillFirst


def _int_arg(name: str, arg: str | None, default: int | None) -> int | None:
    if arg is None or arg == "":
        return default
    try:
        value = int(arg)
    except ValueError:
        raise ConfigError(f"policy '{name}:{arg}': the parameter must be an integer") from None
    if value < 1:
        raise ConfigError(f"policy '{name}:{arg}': the parameter must be >= 1")
    return value


def _float_arg(name: str, arg: str | None, default: float) -> float:
    if arg is None or arg == "":
        return default
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError(f"policy '{name}:{arg}': the parameter must be a number") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"policy '{name}:{arg}': the parameter must be a positive number")
    return value


def _builtin(name: str, arg: str | None) -> Policy | None:
    makers: dict[str, Callable[[str | None], Policy]] = {
        "chunked": lambda a: ChunkedPrefill(_int_arg("chunked", a, 512) or 512),
        "layered": lambda a: LayeredPrefill(_int_arg("layered", a, None)),
        "prefill-first": lambda a: PrefillFirst(),
    }
    try:
        from policies.adaptive import AdaptiveLayered
        from policies.hybrid import HybridPrefill
        makers["hybrid"] = lambda a: HybridPrefill(_int_arg("hybrid", a, 512) or 512)
        makers["adaptive"] = lambda a: AdaptiveLayered(_float_arg("adaptive", a, 100.0))
    except ImportError:
        pass
    maker = makers.get(name)
    return maker(arg) if maker else None


BUILTIN_NAMES = ("chunked[:BUDGET]", "layered[:MAX_G]", "prefill-first", "hybrid[:BUDGET]",
                 "adaptive[:TBT_MS]")


def make_policy(spec: str, max_num_seqs: int | None = None) -> Policy:
    """A policy from its spec; `max_num_seqs` (vLLM's) replaces the policy's own limit."""
    policy = _make_policy(spec.strip())
    if max_num_seqs is not None:
        if not hasattr(policy, "max_num_seqs"):
            raise ConfigError(f"max_num_seqs: policy '{spec}' has no limit on running requests to set")
        policy.max_num_seqs = max_num_seqs  # type: ignore[attr-defined]
    return policy


def _make_policy(spec: str) -> Policy:
    name, _, arg = spec.partition(":")
    if "/" not in name and not name.endswith(".py") and "." not in name:
        policy = _builtin(name, arg or None)
        if policy is not None:
            return policy
        unknown = (f"unknown policy '{spec}' (built-in: {', '.join(BUILTIN_NAMES)}; "
                   "or path/to/file.py:ClassName, module:ClassName)")
        if not arg or not _module_exists(name):  # a top-level module of the user's: mine:Class
            raise ConfigError(unknown)
    return load_user_policy(spec)


def _with_cwd_on_path() -> None:
    """As `python -m` would: module:Class finds modules in the current folder."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def _module_exists(name: str) -> bool:
    _with_cwd_on_path()
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def load_user_policy(spec: str) -> Policy:
    target, sep, cls_name = spec.rpartition(":")
    extra = None
    if target.count(":") == 1 and not target.endswith(".py"):  # module:Class:arg
        target, _, rest = target.partition(":")
        cls_name, extra = rest, cls_name
    if not sep or not target or not cls_name:
        raise ConfigError(f"policy '{spec}': write path/to/file.py:ClassName or module:ClassName")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"policy '{spec}': file {path} not found")
        mod_name = f"layersim_user_policy_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(mod_name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ConfigError(f"policy '{spec}': cannot load {path}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # a user's file: report its error in one line
            raise ConfigError(f"policy '{spec}': {path} failed to import: "
                              f"{type(e).__name__}: {e}") from None
    else:
        _with_cwd_on_path()
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"policy '{spec}': cannot import module '{target}': {e}") from None
    cls: Any = getattr(module, cls_name, None)
    if not inspect.isclass(cls):
        raise ConfigError(f"policy '{spec}': no class '{cls_name}' in {target}")
    try:
        factory: Any = cls
        policy: Any = factory(extra) if extra is not None else factory()
    except Exception as e:
        raise ConfigError(f"policy '{spec}': {cls_name}() failed: {type(e).__name__}: {e}") from None
    check_interface(policy, spec)
    return cast(Policy, policy)


def check_interface(policy: object, spec: str) -> None:
    """Name the first part of the Policy interface the object lacks."""
    if not callable(getattr(policy, "schedule", None)):
        raise ConfigError(f"policy '{spec}' breaks the interface: it needs a method "
                          "schedule(self, state: ReplicaState) -> tuple[Tile, ...]")
    if not isinstance(getattr(policy, "name", None), str):
        raise ConfigError(f"policy '{spec}' breaks the interface: it needs a str attribute 'name'")
    if not isinstance(getattr(policy, "stall_free", None), bool):
        raise ConfigError(f"policy '{spec}' breaks the interface: it needs a bool attribute "
                          "'stall_free' (True if it never skips a running decode)")
