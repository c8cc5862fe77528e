"""Stable Diffusion 3 / 3.5: MMDiT (native) names ``joint_blocks.N.{x_block,context_block}…`` with fused
``attn.qkv``, and diffusers' ``transformer_blocks.N.attn.to_q`` …; the conversion is
:mod:`lora_merge.formats.sd3`."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import ModelFamily, fused_layout_notes, names_match

if TYPE_CHECKING:
    from ..adapter import Adapter

#: names only SD3's native layout has (``final_layer`` is Flux's too, ``context_embedder`` diffusers' too)
_NATIVE_ONLY = re.compile(r"^transformer\.(joint_blocks\.\d+\.|t_embedder\.|y_embedder\.|x_embedder\.proj$)")
#: names only SD3's diffusers layout has (Flux has no patch-embedding conv and no second attention)
_DIFFUSERS_ONLY = re.compile(r"^transformer\.(pos_embed\.proj$|transformer_blocks\.\d+\.attn2\.)")


has_native_names = names_match(_NATIVE_ONLY, "names only SD3's native (MMDiT) layout has")
has_diffusers_only_names = names_match(_DIFFUSERS_ONLY, "names only SD3's diffusers layout has")


def has_sd3_names(adapter: Adapter) -> bool:
    """SD3's MMDiT names (``joint_blocks``, ``t_embedder`` …) or diffusers names only SD3 has
    (``pos_embed.proj``, SD3.5's ``attn2``); SD3 LoRAs of the double-block names it shares with Flux are
    told apart from Flux by their hidden size (:func:`lora_merge.families.flux.is_flux`) and fall back to
    :func:`has_text_stream_names`."""
    return has_native_names(adapter) or has_diffusers_only_names(adapter)


def has_text_stream_names(adapter: Adapter) -> bool:
    """A transformer with a text stream (``add_k_proj``, ``context``…) that no stricter rule claimed."""
    return any(n.startswith("transformer.") and ("add_k_proj" in n or "context" in n) for n in adapter.modules)


FAMILY = ModelFamily(
    name="sd3", display="Stable Diffusion 3 / 3.5", short="SD3/3.5", kind="dit",
    help="MMDiT (kohya, ComfyUI: fused qkv) and diffusers names, converted exactly; priors measure on a "
         "pipeline folder",
    detect=((40, has_sd3_names), (80, has_text_stream_names)),
    diffusers_class="SD3Transformer2DModel", blocks={"transformer_blocks": 18}, hidden=1152,
    block_lists=("transformer_blocks", "joint_blocks"), block_display={"joint_blocks": "transformer_blocks"},
    layout="lora_merge.formats.sd3:LAYOUT", fused_layout="lora_merge.formats.sd3:SD3",
    layout_notes=fused_layout_notes("MMDiT checkpoint names, fused x_block / context_block attn.qkv"),
    pipelines=("StableDiffusion3Pipeline",), pipeline_loader="lora_merge.model_mode.dit_base:load_flow_pipeline",
)
