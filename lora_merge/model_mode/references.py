"""Reference images and prompts (:class:`~lora_merge.masks.References`) encoded for a base model: the one
place that turns a content and a style reference into latents and prompt conditioning (mask training and
``lora-merge calibrate`` both start here)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UsageError
from ..masks import Concept, References
from .base_model import BaseModel
from .images import resolve_images

__all__ = ["encode_concept", "encode_references"]


def encode_concept(base: BaseModel, concept: Concept, role: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(latents N×C×h×w, prompt conditioning)`` of one reference."""
    images = resolve_images(concept.images, base.image_size)
    if images.dim() != 4 or images.shape[1] != 3:
        raise UsageError(f"{role} images must be N×3×H×W, got {tuple(images.shape)}")
    return base.encode_images(images), base.encode_prompt([concept.prompt])


def encode_references(base: BaseModel, references: References, what: str
                      ) -> dict[str, tuple[torch.Tensor, dict[str, Any]]]:  # fmt: skip
    """``{"content": (latents, cond), "style": (latents, cond)}``; a missing prompt is a usage error that
    names ``what`` needs it."""
    references.check_prompts(what)
    return {role: encode_concept(base, concept, role) for role, concept in references.roles()}
