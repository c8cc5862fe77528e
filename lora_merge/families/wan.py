"""Wan 2.x: ``blocks.N`` in both layouts, original (``self_attn.q``, ``cross_attn.k``, ``ffn.0``) and
diffusers (``attn1.to_q``, ``attn2.to_k``, ``ffn.net.0.proj``) names; the rename is
:mod:`lora_merge.formats.wan`."""
from __future__ import annotations

import re

from . import ModelFamily, names_match

_BLOCK_MODULE = re.compile(r"^transformer\.blocks\.\d+\.(self_attn|cross_attn|attn1|attn2|ffn)\.")


is_wan = names_match(_BLOCK_MODULE, "Wan's block modules (original or diffusers names)")


FAMILY = ModelFamily(
    name="wan", display="Wan 2.x", kind="dit",
    help="original (kohya / musubi-tuner, ComfyUI) and diffusers names, renamed exactly",
    detect=((20, is_wan),),
    diffusers_class="WanTransformer3DModel", blocks={"blocks": 40}, hidden=5120, block_lists=("blocks",),
    layout="lora_merge.formats.wan:LAYOUT",
    layout_notes={"native": "original Wan names (self_attn.q, cross_attn.k, ffn.0)",
                  "diffusers": "attn1.to_q, attn2.to_k, ffn.net.0.proj names",
                  "mixed": "both original and diffusers names"},
)
