"""Sampling-time mergers: methods that combine a content and a style LoRA *while sampling* (per layer and
denoising step) and so cannot be saved as one LoRA file — K-LoRA (``k-lora``, :mod:`.klora`) and
``timestep-split`` (:mod:`.timestep_split`), plus any plug-in of the ``lora_merge.sampling_time``
entry-point group.

Each is a :class:`SamplingTimeMerger` declared with :class:`~lora_merge.strategies.Param` s
(:mod:`.base`), on the shared hook layer of :mod:`.hooks`, in one registry (:mod:`.registry`).
``lora-merge strategies`` lists them apart from the file strategies, from their ``describe()``;
:func:`build` makes one for :func:`lora_merge.toyworld.sampling.sample` or a diffusers UNet."""
from __future__ import annotations

from typing import Any

from ..adapter import Adapter
from .base import (
    FLOAT_OR_AUTO,
    NUM_TRAIN_TIMESTEPS,
    STRENGTHS,
    WEIGHTS,
    ParamType,
    SamplingTimeMerger,
)
from .hooks import Layer, LayerHooks, StepRecord, denoising_progress, lora_output, read_timestep
from .klora import KLoRA
from .registry import ENTRY_POINT_GROUP, available_sampling_time, get_sampling_time, register_sampling_time
from .timestep_split import TimestepSplit

__all__ = [
    "ENTRY_POINT_GROUP",
    "FLOAT_OR_AUTO",
    "NUM_TRAIN_TIMESTEPS",
    "STRENGTHS",
    "WEIGHTS",
    "KLoRA",
    "Layer",
    "LayerHooks",
    "ParamType",
    "SamplingTimeMerger",
    "StepRecord",
    "TimestepSplit",
    "available_sampling_time",
    "build",
    "denoising_progress",
    "get_sampling_time",
    "lora_output",
    "read_timestep",
    "register_sampling_time",
]


def build(name: str, content: Adapter, style: Adapter, **params: Any) -> SamplingTimeMerger:
    """An unattached merger of ``content`` and ``style`` (``.attach(unet, scheduler=...)`` / ``.detach()``)."""
    return get_sampling_time(name)(content, style, **params)

