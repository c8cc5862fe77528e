"""The sampling-time mergers in one list: methods that combine two LoRAs *while sampling* (per layer and
denoising step) and so cannot be saved as one LoRA file.  ``lora-merge strategies`` lists them apart;
``build`` makes one for :func:`lora_merge.toyworld.sampling.sample` or a diffusers UNet."""
from __future__ import annotations

from typing import Any

from .adapter import Adapter
from .errors import UsageError
from .klora import SAMPLING_TIME_MERGERS as _KLORA
from .klora import KLoRA
from .timestep_merge import SPEC as _SPLIT
from .timestep_merge import TimestepSplit

#: the listing (plain data: ``lora-merge strategies`` prints it without torch from the CLI catalogue)
SAMPLING_TIME_MERGERS: list[dict[str, Any]] = [*_KLORA, _SPLIT]
_CLASSES = {"k-lora": KLoRA, "timestep-split": TimestepSplit}


def names() -> list[str]:
    return [m["name"] for m in SAMPLING_TIME_MERGERS]


def merger_class(name: str) -> type[KLoRA]:
    if name not in _CLASSES:
        raise UsageError(f"unknown sampling-time merger {name!r}; known: {', '.join(_CLASSES)}")
    return _CLASSES[name]


def build(name: str, content: Adapter, style: Adapter, **params: Any) -> KLoRA:
    """An unattached merger of ``content`` and ``style`` (``.attach(unet, scheduler=...)`` / ``.detach()``)."""
    return merger_class(name)(content, style, **params)


__all__ = ["SAMPLING_TIME_MERGERS", "build", "merger_class", "names"]
