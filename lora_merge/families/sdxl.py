"""Stable Diffusion XL: a UNet of three down blocks at 1024 px (latent 128), two text encoders (2048 wide
cross-attention).  B-LoRA's block table is SDXL's."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import ModelFamily, cross_attention_widths

if TYPE_CHECKING:
    from ..adapter import Adapter

#: block prefix (without the "unet." component) → latent resolution at 1024 px
BLOCK_RESOLUTIONS = {
    "down_blocks.0": 128,
    "down_blocks.1": 64,
    "down_blocks.2": 32,
    "mid_block": 32,
    "up_blocks.0": 32,
    "up_blocks.1": 64,
    "up_blocks.2": 128,
}

_TEN_BLOCKS = re.compile(r"up_blocks\.0\.attentions\.2\.transformer_blocks\.9\.")


def has_second_text_encoder(adapter: Adapter) -> bool:
    return any(n.startswith("text_encoder_2.") for n in adapter.modules)


def has_two_encoder_context(adapter: Adapter) -> bool:
    return 2048 in cross_attention_widths(adapter)


def is_sdxl_by_metadata_or_depth(adapter: Adapter) -> bool:
    """kohya's ``ss_base_model_version`` says so, or a 10-deep transformer in ``up_blocks.0`` (SDXL's)."""
    if str((adapter.metadata or {}).get("ss_base_model_version", "")).startswith("sdxl"):
        return True
    return any(_TEN_BLOCKS.search(n) for n in adapter.modules)


FAMILY = ModelFamily(
    name="sdxl", display="Stable Diffusion XL", short="SDXL", kind="unet",
    help="UNet and both text encoders' LoRAs (kohya's SGM names too); DuoLoRA's resolution priors and "
         "B-LoRA's table; model mode on a pipeline folder",
    detect=((90, has_second_text_encoder), (100, has_two_encoder_context), (130, is_sdxl_by_metadata_or_depth)),
    block_resolutions=BLOCK_RESOLUTIONS, native_latent=128,
    priors={"b-lora": "lora_merge.priors.table:b_lora"},
    pipelines=("StableDiffusionXLPipeline",),
)
