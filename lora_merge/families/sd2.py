"""Stable Diffusion 2.x: SD 1.x's UNet blocks, cross-attention 1024 wide (OpenCLIP ViT-H)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import ModelFamily, cross_attention_widths
from .sd1 import BLOCK_RESOLUTIONS

if TYPE_CHECKING:
    from ..adapter import Adapter


def has_openclip_h_context(adapter: Adapter) -> bool:
    return 1024 in cross_attention_widths(adapter)


FAMILY = ModelFamily(
    name="sd2", display="Stable Diffusion 2.x", short="SD 2.x", kind="unet",
    help="UNet and text-encoder LoRAs; DuoLoRA's resolution priors (SD 1.x's blocks)",
    detect=((120, has_openclip_h_context),),
    block_resolutions=BLOCK_RESOLUTIONS, native_latent=64,
)
