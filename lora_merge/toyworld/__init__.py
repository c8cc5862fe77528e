"""A tiny SDXL-shaped text-to-image world for judging LoRA merges (see docs/toyworld.md).

Shapes are the content, styles (palette, texture, background, outline) the style.  Three subjects
(``sks`` a ring, ``ohwx`` an hourglass, ``tqk`` a notched square) and three styles (``zkz``, ``bfk``,
``mrv``) are held out of base training; the suite (:mod:`.suite`) pairs a DreamBooth LoRA of each subject
with a StyleDrop LoRA of each style.  ``sks`` + ``zkz`` is the bundled default pair.  Needs the
``diffusers`` extra (diffusers, peft).

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
from .suite import SUITE, Pair, pairs
from .train import LORA_DIR, lora_file, lora_training_set
from .world import (
    CONTENT_WORD,
    IMAGE_SIZE,
    SEEN_SHAPES,
    SEEN_STYLES,
    SHAPES,
    STYLE_CONCEPTS,
    STYLE_WORD,
    STYLES,
    SUBJECTS,
    caption,
    parse_prompt,
    render,
    render_batch,
)

#: the content LoRA's prompt (its training caption)
CONTENT_PROMPT = "a sks object"
#: the style LoRA's training caption (its one reference image is a circle)
STYLE_PROMPT = "a circle in zkz style"
#: what a merge of the two must draw
JOINT_PROMPT = "a sks object in zkz style"


def reference_images(concept: str, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """The images the suite's LoRA of ``concept`` (a subject or style word; "content"/"style": the default
    pair's) was trained on: a subject's DreamBooth photos, a style's augmented reference image."""
    try:
        return lora_training_set(concept, n, seed)[0]
    except ValueError as e:
        raise UsageError(str(e)) from None


def bundled_loras() -> dict[str, Path]:
    """Paths of the default pair's content (``sks``) and style (``zkz``) LoRA files (diffusers format)."""
    return {"content": LORA_DIR / lora_file(CONTENT_WORD), "style": LORA_DIR / lora_file(STYLE_WORD)}


__all__ = [
    "ARCH",
    "CONTENT_PROMPT",
    "CONTENT_WORD",
    "DATA_DIR",
    "IMAGE_SIZE",
    "JOINT_PROMPT",
    "SEEN_SHAPES",
    "SEEN_STYLES",
    "SHAPES",
    "STYLES",
    "STYLE_CONCEPTS",
    "STYLE_PROMPT",
    "STYLE_WORD",
    "SUBJECTS",
    "SUITE",
    "Judge",
    "Pair",
    "ToyWorld",
    "apply_lora",
    "bundled_loras",
    "caption",
    "load_base",
    "load_judge",
    "pairs",
    "parse_prompt",
    "reference_images",
    "render",
    "render_batch",
    "sample",
]
