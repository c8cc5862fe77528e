"""K-LoRA, the sampling-time merger: :mod:`lora_merge.sampling_time.klora` (this path re-exports it)."""
from __future__ import annotations

from .sampling_time.hooks import DEFAULT_NUM_TRAIN_TIMESTEPS, StepRecord, denoising_progress
from .sampling_time.klora import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    KLoRA,
    choose,
    layer_scores,
    style_scale,
    topk_abs_sum,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_NUM_TRAIN_TIMESTEPS",
    "KLoRA",
    "StepRecord",
    "choose",
    "denoising_progress",
    "layer_scores",
    "style_scale",
    "topk_abs_sum",
]
