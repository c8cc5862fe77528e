"""Wan 2.x: ``blocks.N`` in both layouts, original (``self_attn.q``, ``cross_attn.k``, ``ffn.0``) and
diffusers (``attn1.to_q``, ``attn2.to_k``, ``ffn.net.0.proj``) names; the rename is
:mod:`lora_merge.formats.wan`."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import ModelFamily

if TYPE_CHECKING:
    from ..adapter import Adapter

_BLOCK_MODULE = re.compile(r"^transformer\.blocks\.\d+\.(self_attn|cross_attn|attn1|attn2|ffn)\.")


def is_wan(adapter: Adapter) -> bool:
    return any(_BLOCK_MODULE.match(n) for n in adapter.modules)


FAMILY = ModelFamily(
    name="wan", display="Wan 2.x", kind="dit",
    help="original (kohya / musubi-tuner, ComfyUI) and diffusers names, renamed exactly",
    detect=((20, is_wan),),
    diffusers_class="WanTransformer3DModel", blocks={"blocks": 40}, hidden=5120, block_lists=("blocks",),
    layout="lora_merge.formats.wan:LAYOUT",
    layout_notes={"native": "original Wan names (self_attn.q, cross_attn.k, ffn.0)",
                  "diffusers": "diffusers names (attn1.to_q, attn2.to_k, ffn.net.0.proj)",
                  "mixed": "both original and diffusers names"},
)
