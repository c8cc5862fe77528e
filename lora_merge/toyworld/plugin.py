"""The toy world's registrations: it plugs into the core like a third-party package would.

Imported by the first lookup that needs it (:mod:`lora_merge.plugins`: its ``BUILTIN_PLUGINS`` entry
declares what it fills, so an ordinary merge never imports the toy world).  Registers the base model
``"toyworld"``, the image sources ``toyworld:content`` / ``toyworld:style`` (the default pair) and
``toyworld:<word>`` for each held-out concept, and the model family ``"toyworld"`` (:data:`FAMILY`: block
resolutions, display name, detection), whose resolution rule is the priors table ``"toyworld"``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..families import ModelFamily, register_family
from ..model_mode.base_model import BaseModel, register_base_model
from ..model_mode.images import register_image_source
from . import world
from .model import ARCH, load_base
from .train import lora_training_set

#: the toy world's UNet at its native 16 px: SDXL's block layout at 16 → 8 → 4
BLOCK_RESOLUTIONS = {
    "down_blocks.0": 16,
    "down_blocks.1": 8,
    "down_blocks.2": 4,
    "mid_block": 4,
    "up_blocks.0": 4,
    "up_blocks.1": 8,
    "up_blocks.2": 16,
}
NATIVE_LATENT = 16


def base_model(device: torch.device, dtype: torch.dtype) -> BaseModel:
    """The toy world as a model-mode :class:`~lora_merge.model_mode.base_model.BaseModel` (pixel space)."""
    base = load_base(device=device)
    unet = base.unet if dtype == torch.float32 else base.unet.to(dtype)

    def encode_prompt(prompts: list[str]) -> Any:
        return base.encode_prompt(prompts)

    return BaseModel(
        unet=unet,
        scheduler=base.scheduler,
        arch=ARCH,
        image_size=int(base.image_size),
        encode_prompt_fn=encode_prompt,
        encode_images_fn=None,
        name=ARCH,
        device=device,
        dtype=dtype,
    )


def _images(concept: str):
    """The images the suite's LoRA of ``concept`` was trained on, with their training caption (a
    subject's 6 DreamBooth photos; 64 augmentations of a style's one reference image)."""

    def source(n: int | None, seed: int) -> tuple[torch.Tensor, list[str]]:
        return lora_training_set(concept, None if n is None else int(n), seed)

    return source


def is_toyworld(adapter: Any) -> bool:
    """The bundled LoRAs (and LoRAs trained the same way) name the toy world in their metadata (the claim
    this plug-in's ``BUILTIN_PLUGINS`` entry declares, so detection loads the plug-in only for them)."""
    return ARCH in str((adapter.metadata or {}).get("modelspec.architecture", ""))


#: the toy world as a model family; its priors table is the paper's rule on these blocks (4×4 → content,
#: 8×8 → style; measured: docs/priors.md)
FAMILY = ModelFamily(
    name=ARCH, display="lora-merge toy world (SDXL-shaped)", short="toyworld", kind="unet",
    help="the bundled benchmark world: base model, judge, reference images, LoRAs",
    detect=((0, is_toyworld),), block_resolutions=BLOCK_RESOLUTIONS, native_latent=NATIVE_LATENT,
)


def register() -> None:
    register_family(FAMILY)
    register_base_model(ARCH, base_model)
    register_image_source(f"{ARCH}:content", _images("content"))
    register_image_source(f"{ARCH}:style", _images("style"))
    for word in (*world.SUBJECTS, *world.STYLE_CONCEPTS):
        register_image_source(f"{ARCH}:{word}", _images(word))
