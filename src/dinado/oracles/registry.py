"""Names to objects: oracle types to their builders (configs), import paths to functions.

Configs: ``register_oracle(type_name, builder)`` and ``oracle_from_config(config)``.

A config is a plain dict with a ``"type"`` (e.g. parsed YAML); ``oracle.to_config()`` gives one back. Each
oracle type's builder sits next to its class and registers itself when its module is imported: the
built-in types (keywords, regex, callable, classifier, all_of, any_of, not, weighted_product, floor) when
``dinado.oracles`` is imported, in that order. A task registers its own types the same way, e.g.
:mod:`dinado.tasks.formality` registers ``tv`` (:class:`~dinado.tasks.formality.TVOracle`).

The core never imports a task by an ``import`` statement (docs/architecture.md). So that configs naming a
type of a built-in task still load without importing the task first, :data:`TASK_TYPES` maps such a type
to the module that registers it; :func:`oracle_from_config` imports that module by name
(``importlib.import_module``) on the type's first use. Any other unregistered type is refused with the list
of the known ones.

A builder is ``builder(config, where) -> oracle``: ``where`` names the place of ``config`` in the whole
config (``"oracle config.oracles[1]"``) for its error messages; :func:`check_keys` checks the keys, and
:func:`build_from_config` builds a nested config.

Import paths: :func:`load_callable` imports ``"package.module:function"`` (user oracles, keyword readers),
:func:`import_path` finds the path of a function, so that an oracle holding it can be written as a config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from .base import OracleBase

Builder = Callable[[Mapping, str], OracleBase]

_BUILDERS: dict[str, Builder] = {}

# type -> the module (of a built-in task) that registers it when imported
TASK_TYPES: dict[str, str] = {"tv": "dinado.tasks.formality"}


def register_oracle(type_name: str, builder: Builder) -> None:
    """Make ``{"type": type_name, ...}`` configs build with ``builder(config, where)``.

    A type is registered once: another builder for a registered type is refused (registering the same
    function again does nothing).
    """
    if not isinstance(type_name, str) or not type_name.strip():
        raise TypeError(f"register_oracle: the type name must be a non-empty string, got {type_name!r}")
    if not callable(builder):
        raise TypeError(
            f"register_oracle: the builder of {type_name!r} must be callable as builder(config, where), "
            f"got {builder!r}"
        )
    old = _BUILDERS.get(type_name)
    if old is not None and old is not builder:
        raise ValueError(
            f"register_oracle: the oracle type {type_name!r} is already registered (by {_name(old)}); "
            "choose another type name"
        )
    _BUILDERS[type_name] = builder


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', None) or repr(fn)}"


def known_types() -> list[str]:
    """The registered types in registration order, then the task types not imported yet."""
    return [*_BUILDERS, *(t for t in TASK_TYPES if t not in _BUILDERS)]


def check_keys(config: Mapping, required: set[str], optional: set[str], where: str) -> None:
    """Refuse unknown keys (``type`` is always valid) and missing required ones, naming the valid ones."""
    valid = required | optional | {"type"}
    for key in config:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(valid))}")
    missing = sorted(required - set(config))
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}; required keys: {', '.join(sorted(required))}")


def build_from_config(config: Any, where: str) -> OracleBase:
    """:func:`oracle_from_config` for a config found at ``where`` (named in the errors)."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: an oracle config must be a mapping with a 'type', got {config!r}")
    if "type" not in config:
        raise ValueError(f"{where}: missing key 'type'; valid types: {', '.join(known_types())}")
    kind = config["type"]
    if kind not in _BUILDERS and kind in TASK_TYPES:
        importlib.import_module(TASK_TYPES[kind])  # registers the type
    if kind not in _BUILDERS:
        raise ValueError(f"{where}: unknown oracle type {kind!r}; valid types: {', '.join(known_types())}")
    return _BUILDERS[kind](config, where)


def oracle_from_config(config: Mapping[str, Any]) -> OracleBase:
    """Build an oracle from a plain dict (e.g. parsed YAML): ``{"type": "keywords", "keywords": [...]}``.

    Types: keywords, regex, callable, classifier, all_of, any_of, not, weighted_product, floor, tv (German/Spanish
    formal or informal address, :class:`dinado.tasks.formality.TVOracle`), and any registered with
    :func:`register_oracle`; see docs/oracles.md.
    The oracles read text; ``as_token_oracle(oracle, tokenizer)`` makes one that reads token ids.
    """
    return build_from_config(config, "oracle config")


# ----------------------------------------------------------------------------------------------------------
# functions by import path


def load_callable(path: str) -> Callable:
    """Import ``"package.module:function"`` (the attribute may be dotted: ``"pkg.mod:Class.method"``)."""
    if not isinstance(path, str):
        raise TypeError(f"expected an import path 'package.module:function', got {path!r}")
    module_name, colon, attr = path.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not colon or not module_name or not attr or ":" in attr:
        raise ValueError(f"expected an import path of the form 'package.module:function', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ImportError(
                f"cannot load {path!r}: no module named {exc.name!r} (is it installed or on PYTHONPATH?)"
            ) from exc
        raise ImportError(f"cannot load {path!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ImportError(f"cannot load {path!r}: importing {module_name!r} failed: {exc}") from exc
    owner = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"cannot load {path!r}: {owner!r} has no attribute {part!r}")
        obj = getattr(obj, part)
        owner = f"{owner}:{part}" if owner == module_name else f"{owner}.{part}"
    if not callable(obj):
        raise TypeError(f"cannot load {path!r}: it is a {type(obj).__name__}, not a callable")
    return obj


def import_path(fn: Callable) -> str | None:
    """``"module:qualname"`` if importing that gives back ``fn`` itself, else None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    path = f"{module}:{qualname}"
    try:
        return path if load_callable(path) is fn else None
    except Exception:
        return None
