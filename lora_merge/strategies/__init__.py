"""Strategy registry.  Built-in strategies register with :func:`register`; third-party packages add
theirs through the entry-point group ``lora_merge.strategies`` (value: ``module:Class``), loaded by
:func:`lora_merge.plugins.load_entry_points` (a broken plug-in warns once and the others load)."""
from __future__ import annotations

from ..plugins import ClassRegistry
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
#: each module registers its strategies on import
_BUILTIN_MODULES = (
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
REGISTRY = ClassRegistry(MergeStrategy, "strategy", ENTRY_POINT_GROUP, _BUILTIN_MODULES)
#: class decorator: add a strategy to the registry under ``cls.name``
register = REGISTRY.register


def available_strategies() -> dict[str, type[MergeStrategy]]:
    REGISTRY.load()
    return dict(sorted(REGISTRY.classes.items()))


def get_strategy(name: str) -> type[MergeStrategy]:
    return REGISTRY.get(name)
