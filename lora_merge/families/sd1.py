"""Stable Diffusion 1.x: a UNet of four down blocks at 512 px (latent 64), cross-attention 768 wide (CLIP ViT-L)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import ModelFamily, cross_attention_widths

if TYPE_CHECKING:
    from ..adapter import Adapter

#: block prefix (without the "unet." component) → latent resolution at 512 px
BLOCK_RESOLUTIONS = {
    "down_blocks.0": 64,
    "down_blocks.1": 32,
    "down_blocks.2": 16,
    "down_blocks.3": 8,
    "mid_block": 8,
    "up_blocks.0": 8,
    "up_blocks.1": 16,
    "up_blocks.2": 32,
    "up_blocks.3": 64,
}


def has_clip_l_context(adapter: Adapter) -> bool:
    return 768 in cross_attention_widths(adapter)


def has_attentions_in_the_first_block(adapter: Adapter) -> bool:
    """SDXL has no attention in ``down_blocks.0``; SD 2.x has the same blocks (told apart by width only)."""
    return any(n.startswith("unet.down_blocks.0.attentions") for n in adapter.modules)


FAMILY = ModelFamily(
    name="sd1", display="Stable Diffusion 1.x", short="SD 1.x", kind="unet",
    help="UNet and text-encoder LoRAs; DuoLoRA's resolution priors; model mode on a pipeline folder",
    detect=((110, has_clip_l_context), (140, has_attentions_in_the_first_block)),
    block_resolutions=BLOCK_RESOLUTIONS, native_latent=64,
    pipelines=("StableDiffusionPipeline",),
)
