"""The toy world's registrations: it plugs into the core like a third-party package would.

Imported by :func:`lora_merge.plugins.load_all` (it is in ``BUILTIN_PLUGINS``).  Registers the base model
``"toyworld"``, the image sources ``toyworld:content`` / ``toyworld:style``, the priors table
``"toyworld"`` and the architecture ``"toyworld"`` (block resolutions, display name, detection).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..model_mode.base_model import BaseModel, register_base_model
from ..model_mode.images import register_image_source
from . import reference_images
from .model import load_base


def base_model(device: torch.device, dtype: torch.dtype) -> BaseModel:
    """The toy world as a model-mode :class:`~lora_merge.model_mode.base_model.BaseModel` (pixel space)."""
    base = load_base(device=device)
    unet = base.unet if dtype == torch.float32 else base.unet.to(dtype)

    def encode_prompt(prompts: list[str]) -> Any:
        return base.encode_prompt(prompts)

    return BaseModel(
        unet=unet,
        scheduler=base.scheduler,
        arch="toyworld",
        image_size=int(base.image_size),
        encode_prompt_fn=encode_prompt,
        encode_images_fn=None,
        name="toyworld",
        device=device,
        dtype=dtype,
    )


def _images(concept: str):
    def source(size: int) -> torch.Tensor:
        imgs = reference_images(concept)
        if imgs.shape[-1] != size:
            imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
        return imgs

    return source


def register() -> None:
    register_base_model("toyworld", base_model)
    register_image_source("toyworld:content", _images("content"))
    register_image_source("toyworld:style", _images("style"))
