"""Strategy registry.  Built-in strategies register with :func:`register`; third-party packages add
theirs through the entry-point group ``lora_merge.strategies`` (value: ``module:Class``)."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..errors import UsageError
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
    for ep in entry_points(group="lora_merge.strategies"):
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in must not take the CLI down
            import warnings

            warnings.warn(f"could not load strategy plug-in {ep.name!r} ({ep.value}): {exc}", stacklevel=2)
            continue
        if isinstance(obj, type) and issubclass(obj, MergeStrategy):
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
