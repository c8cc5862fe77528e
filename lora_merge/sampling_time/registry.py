"""The one registry of sampling-time mergers.  Built-ins register with :func:`register_sampling_time`;
third-party packages add theirs through the entry-point group ``lora_merge.sampling_time`` (value:
``module:Class``, a :class:`~lora_merge.sampling_time.base.SamplingTimeMerger` subclass), loaded on the
first lookup by :func:`lora_merge.plugins.load_entry_points`, the loader of the strategies' group too: a
broken plug-in warns once and the others load."""
from __future__ import annotations

from ..plugins import ClassRegistry
from .base import SamplingTimeMerger

__all__ = ["ENTRY_POINT_GROUP", "available_sampling_time", "get_sampling_time", "register_sampling_time"]

#: the entry-point group of third-party sampling-time mergers (value: ``module:Class``)
ENTRY_POINT_GROUP = "lora_merge.sampling_time"
#: each module registers its merger on import
BUILTIN_MODULES = ("lora_merge.sampling_time.klora", "lora_merge.sampling_time.timestep_split")
REGISTRY = ClassRegistry(SamplingTimeMerger, "sampling-time merger", ENTRY_POINT_GROUP, BUILTIN_MODULES)
#: class decorator: add a sampling-time merger to the registry under ``cls.name``
register_sampling_time = REGISTRY.register


def available_sampling_time() -> dict[str, type[SamplingTimeMerger]]:
    """Every sampling-time merger by name: the built-ins (``k-lora``, ``timestep-split``), then plug-ins."""
    REGISTRY.load()
    classes = REGISTRY.classes
    builtin = [n for n, c in classes.items() if c.__module__ in BUILTIN_MODULES]
    return {n: classes[n] for n in [*builtin, *sorted(set(classes) - set(builtin))]}


def get_sampling_time(name: str) -> type[SamplingTimeMerger]:
    return REGISTRY.get(name)
