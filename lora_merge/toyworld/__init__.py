"""A tiny SDXL-shaped text-to-image world for judging LoRA merges (see docs/toyworld.md).

Shapes are the content, styles (palette + fine texture) the style; ``sks`` (a ring) and ``zkz``
(purple/lime diagonal stripes) are held out of base training and learned by the bundled content and
style LoRAs.  Needs the ``diffusers`` extra (diffusers, peft).

>>> from lora_merge import toyworld as tw
>>> world = tw.load_base()
>>> imgs = tw.sample(world, tw.JOINT_PROMPT, seeds=range(8), adapter=tw.bundled_loras()["style"])
>>> tw.load_judge().predict(imgs)

Its registrations (base model, reference images, priors table, architecture) are in :mod:`.plugin`; judged
benchmarks on it are in :mod:`lora_merge.bench`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from .judge import Judge, load_judge
from .model import ARCH, DATA_DIR, ToyWorld, load_base
from .sampling import apply_lora, sample
from .train import LORA_FILES, lora_training_set
from .world import (
    CONTENT_WORD,
    IMAGE_SIZE,
    SEEN_SHAPES,
    SEEN_STYLES,
    SHAPES,
    STYLE_WORD,
    STYLES,
    caption,
    parse_prompt,
    render,
    render_batch,
)

#: the content LoRA's prompt (its training caption)
CONTENT_PROMPT = "a sks object"
#: the style LoRA's check prompt (a seen shape in the new style; it was trained on every seen shape)
STYLE_PROMPT = "a circle in zkz style"
#: what a merge of the two must draw
JOINT_PROMPT = "a sks object in zkz style"


def reference_images(concept: str, n: int = 64, seed: int = 0) -> torch.Tensor:
    """The images the bundled LoRA of ``concept`` ("content" or "style") was trained on (seed 0)."""
    if concept not in ("content", "style"):
        raise UsageError(f"concept must be 'content' or 'style', not {concept!r}")
    return lora_training_set(concept, n, seed)[0]


def bundled_loras() -> dict[str, Path]:
    """Paths of the shipped content and style LoRA files (standard diffusers LoRA safetensors)."""
    return {k: DATA_DIR / v for k, v in LORA_FILES.items()}


__all__ = [
    "ARCH",
    "CONTENT_PROMPT",
    "CONTENT_WORD",
    "IMAGE_SIZE",
    "JOINT_PROMPT",
    "SEEN_SHAPES",
    "SEEN_STYLES",
    "SHAPES",
    "STYLES",
    "STYLE_PROMPT",
    "STYLE_WORD",
    "Judge",
    "ToyWorld",
    "apply_lora",
    "bundled_loras",
    "caption",
    "load_base",
    "load_judge",
    "parse_prompt",
    "reference_images",
    "render",
    "render_batch",
    "sample",
]
