"""The one registry of sampling-time mergers.  Built-ins register with :func:`register_sampling_time`;
third-party packages add theirs through the entry-point group ``lora_merge.sampling_time`` (value:
``module:Class``, a :class:`~lora_merge.sampling_time.base.SamplingTimeMerger` subclass), loaded on the
first lookup by :func:`lora_merge.plugins.load_entry_points`, the loader of the strategies' group too: a
broken plug-in warns once and the others load."""
from __future__ import annotations

import importlib

from ..errors import UsageError
from ..plugins import load_entry_points
from .base import SamplingTimeMerger

__all__ = ["ENTRY_POINT_GROUP", "available_sampling_time", "get_sampling_time", "register_sampling_time"]

#: the entry-point group of third-party sampling-time mergers (value: ``module:Class``)
ENTRY_POINT_GROUP = "lora_merge.sampling_time"
_REGISTRY: dict[str, type[SamplingTimeMerger]] = {}
#: each module registers its merger on import
BUILTIN_MODULES = ("lora_merge.sampling_time.klora", "lora_merge.sampling_time.timestep_split")
_loaded = False


def register_sampling_time(cls: type[SamplingTimeMerger]) -> type[SamplingTimeMerger]:
    """Class decorator: add a sampling-time merger to the registry under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, SamplingTimeMerger)):
        raise TypeError(f"{cls!r} is not a SamplingTimeMerger subclass")
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _add_plugin(entry: str, obj: object) -> None:
    """An entry point's class joins the registry (a built-in of the same name wins)."""
    if not (isinstance(obj, type) and issubclass(obj, SamplingTimeMerger)):
        raise TypeError(f"{obj!r} is not a SamplingTimeMerger subclass")
    if not getattr(obj, "name", None):
        raise TypeError(f"{obj.__qualname__} has no name")
    _REGISTRY.setdefault(obj.name, obj)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    load_entry_points(ENTRY_POINT_GROUP, "sampling-time merger", _add_plugin)


def available_sampling_time() -> dict[str, type[SamplingTimeMerger]]:
    """Every sampling-time merger by name: the built-ins (``k-lora``, ``timestep-split``), then plug-ins."""
    _load_all()
    builtin = [n for n, c in _REGISTRY.items() if c.__module__ in BUILTIN_MODULES]
    return {n: _REGISTRY[n] for n in [*builtin, *sorted(set(_REGISTRY) - set(builtin))]}


def get_sampling_time(name: str) -> type[SamplingTimeMerger]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(f"unknown sampling-time merger {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
