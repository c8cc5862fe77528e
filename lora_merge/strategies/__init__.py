"""Strategy registry.  Built-in strategies register with :func:`register`; third-party packages add
theirs through the entry-point group ``lora_merge.strategies`` (value: ``module:Class``), loaded by
:func:`lora_merge.plugins.load_entry_points` (a broken plug-in warns once and the others load)."""
from __future__ import annotations

import importlib

from ..errors import UsageError
from ..plugins import load_entry_points
from .base import (
    DirectKernel,
    LayerContext,
    LayerInput,
    LayerResult,
    MergePlan,
    MergeStrategy,
    Param,
    PlannedLayer,
)

__all__ = [
    "DirectKernel",
    "LayerContext",
    "LayerInput",
    "LayerResult",
    "MergePlan",
    "MergeStrategy",
    "Param",
    "PlannedLayer",
    "available_strategies",
    "get_strategy",
    "register",
]

#: the entry-point group of third-party strategies (value: ``module:Class``)
ENTRY_POINT_GROUP = "lora_merge.strategies"
_REGISTRY: dict[str, type[MergeStrategy]] = {}
_BUILTIN_MODULES = (
    # each module registers its strategies on import
    "lora_merge.strategies.linear",
    "lora_merge.strategies.svd",
    "lora_merge.strategies.ties",
    "lora_merge.strategies.dare",
    "lora_merge.strategies.magnitude",
    "lora_merge.strategies.blocks",
    "lora_merge.strategies.ziplora",
    "lora_merge.strategies.duolora",
    "lora_merge.strategies.nplora",
)
_loaded = False


def register(cls: type[MergeStrategy]) -> type[MergeStrategy]:
    """Class decorator: add a strategy to the registry under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
    load_entry_points(ENTRY_POINT_GROUP, "strategy", _add_plugin)


def _add_plugin(entry: str, obj: object) -> None:
    """An entry point's class joins the registry (a built-in of the same name wins)."""
    if not (isinstance(obj, type) and issubclass(obj, MergeStrategy)):
        raise TypeError(f"{obj!r} is not a MergeStrategy subclass")
    if not getattr(obj, "name", None):
        raise TypeError(f"{obj.__qualname__} has no name")
    _REGISTRY.setdefault(obj.name, obj)


def available_strategies() -> dict[str, type[MergeStrategy]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_strategy(name: str) -> type[MergeStrategy]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
