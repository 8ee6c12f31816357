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
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from costmodel.errors import ConfigError
from policies import guard
from policies.base import Policy
from policies.chunked import ChunkedPrefill
from policies.layered import LayeredPrefill
from policies.prefill_first import PrefillFirst


def _empty_arg(name: str, arg: str | None) -> bool:
    """No parameter given; 'name:' with nothing after the colon is a mistake, not the default."""
    if arg is not None and not arg.strip():
        raise ConfigError(f"policy '{name}:{arg}': nothing after ':' (write '{name}' for the "
                          f"default, or give the parameter: {_FORMS[name]})")
    return arg is None


def _int_arg(name: str, arg: str | None, default: int | None) -> int | None:
    if _empty_arg(name, arg):
        return default
    assert arg is not None
    try:
        value = int(arg)
    except ValueError:
        raise ConfigError(f"policy '{name}:{arg}': the parameter must be an integer") from None
    if value < 1:
        raise ConfigError(f"policy '{name}:{arg}': the parameter must be >= 1")
    return value


def _float_arg(name: str, arg: str | None, default: float) -> float:
    if _empty_arg(name, arg):
        return default
    assert arg is not None
    try:
        value = float(arg)
    except ValueError:
        raise ConfigError(f"policy '{name}:{arg}': the parameter must be a number") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"policy '{name}:{arg}': the parameter must be a positive number")
    return value


def _prefill_first(arg: str | None) -> Policy:
    if arg is not None:  # refused rather than silently dropped
        raise ConfigError(f"policy 'prefill-first:{arg}': prefill-first takes no parameter "
                          "(write 'prefill-first')")
    return PrefillFirst()


def _builtin(name: str, arg: str | None) -> Policy | None:
    makers: dict[str, Callable[[str | None], Policy]] = {
        "chunked": lambda a: ChunkedPrefill(_int_arg("chunked", a, 512) or 512),
        "layered": lambda a: LayeredPrefill(_int_arg("layered", a, None)),
        "prefill-first": _prefill_first,
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
_FORMS = {"chunked": "chunked:512 (an integer token budget >= 1)",
          "layered": "layered:16 (an integer number of layer groups >= 1)",
          "hybrid": "hybrid:512 (an integer token budget >= 1)",
          "adaptive": "adaptive:100 (a positive TBT target in ms, e.g. 100, 12.5 or 1e2)"}

# The policies this registry built from a built-in name: the only ones an executor may run
# unchecked. Registry knowledge, not an attribute a user's class could set on itself.
_TRUSTED: weakref.WeakSet[object] = weakref.WeakSet()


def is_trusted(policy: object) -> bool:
    """Whether `policy` is a built-in the registry made (and no one has since replaced its
    `schedule` on the instance): executors skip the checks of `schedule_checked` for it."""
    try:
        return policy in _TRUSTED and "schedule" not in vars(policy)
    except TypeError:  # unhashable, or no __dict__: not one of ours
        return False


def make_policy(spec: str, max_num_seqs: int | None = None) -> Policy:
    """A policy from its spec; `max_num_seqs` (vLLM's) replaces the policy's own limit."""
    policy = _make_policy(spec.strip())
    if max_num_seqs is not None:
        def set_limit() -> bool:
            if not hasattr(policy, "max_num_seqs"):
                return False
            policy.max_num_seqs = max_num_seqs  # type: ignore[attr-defined]
            return True

        if not _guarded(spec, "setting max_num_seqs:", set_limit, guard.source_file(policy)):
            raise ConfigError(f"max_num_seqs: policy '{spec}' has no limit on running requests to set")
    return policy


def _make_policy(spec: str) -> Policy:
    name, _, arg = spec.partition(":")
    if "/" not in name and not name.endswith(".py") and "." not in name:
        policy = _builtin(name, arg if ":" in spec else None)
        if policy is not None:
            _TRUSTED.add(policy)
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
    """Import the user's file or module and construct the class, each step under guard
    (policies/guard.py): whatever it raises, `SystemExit` and `KeyboardInterrupt` included, and
    a step that runs past LOAD_LIMIT_S, is a one-line ConfigError naming the spec and file:line."""
    target, sep, cls_name = spec.rpartition(":")
    extra = None
    if target.count(":") == 1 and not target.endswith(".py"):  # module:Class:arg
        target, _, rest = target.partition(":")
        cls_name, extra = rest, cls_name
    if not sep or not target or not cls_name:
        raise ConfigError(f"policy '{spec}': write path/to/file.py:ClassName or module:ClassName")
    user_file: str | None = None
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
        user_file = str(path)
        loader = mod_spec.loader
        _guarded(spec, f"{path} failed to import:", lambda: loader.exec_module(module), user_file)
    else:
        _with_cwd_on_path()
        try:
            module = _guarded(spec, f"module '{target}' failed to import:",
                              lambda: importlib.import_module(target), None)
        except ConfigError as e:
            if isinstance(e.__cause__, ImportError):
                raise ConfigError(f"policy '{spec}': cannot import module '{target}': "
                                  f"{e.__cause__}") from None
            raise
        user_file = getattr(module, "__file__", None)
    cls: Any = _guarded(spec, f"reading {cls_name} from {target}:",
                        lambda: getattr(module, cls_name, None), user_file)
    if not inspect.isclass(cls):
        raise ConfigError(f"policy '{spec}': no class '{cls_name}' in {target}")
    factory: Any = cls
    policy: Any = _guarded(spec, f"{cls_name}()",
                           lambda: factory(extra) if extra is not None else factory(), user_file,
                           guard.defined_at(cls, "__init__"))
    check_interface(policy, spec)
    return cast(Policy, policy)


def _guarded(spec: str, doing: str, fn: Callable[[], Any], user_file: str | None,
             fallback: str | None = None) -> Any:
    """fn() under guard; what it raised becomes a ConfigError (caused by it, for ImportError)."""
    value, err, timed_out = guard.call_guarded(fn, guard.LOAD_LIMIT_S)
    if err is None:
        return value
    what = guard.describe(err, timed_out, guard.LOAD_LIMIT_S, user_file, fallback)
    raise ConfigError(f"policy '{spec}': {doing} {what}") from (
        err if isinstance(err, ImportError) and not timed_out else None)


def check_interface(policy: object, spec: str) -> None:
    """Name the first part of the Policy interface the object lacks (its attributes are read
    under guard: a property that raises is the user's error, reported in one line)."""
    def read(attr: str) -> Any:
        value, why = guard.read_attr(policy, attr, guard.LOAD_LIMIT_S)
        if why is not None:
            raise ConfigError(f"policy '{spec}': reading its '{attr}' {why}")
        return value

    if not callable(read("schedule")):
        raise ConfigError(f"policy '{spec}' breaks the interface: it needs a method "
                          "schedule(self, state: ReplicaState) -> tuple[Tile, ...]")
    if not isinstance(read("name"), str):
        raise ConfigError(f"policy '{spec}' breaks the interface: it needs a str attribute 'name'")
    if not isinstance(read("stall_free"), bool):
        raise ConfigError(f"policy '{spec}' breaks the interface: it needs a bool attribute "
                          "'stall_free' (True if it never skips a running decode)")
