"""Qwen-Image: FLUX.1's double-stream block names in diffusers (``transformer_blocks.N.attn.to_q`` …) but
60 blocks, and MLP/modulation names of its own (``img_mlp``, ``txt_mod`` …).  No native layout to convert."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import ModelFamily

if TYPE_CHECKING:
    from ..adapter import Adapter

_OWN_NAMES = re.compile(r"^transformer\.transformer_blocks\.\d+\.(img_mlp|txt_mlp|img_mod|txt_mod)\.")
_DOUBLE_INDEX = re.compile(r"^transformer\.transformer_blocks\.(\d+)\.attn\.")


def is_qwen_image(adapter: Adapter) -> bool:
    """Qwen-Image's own module names, or attention of hidden size 3072 in a block FLUX.1 does not have (≥ 19)."""
    if any(_OWN_NAMES.match(n) for n in adapter.modules):
        return True
    if any(n.startswith("transformer.single_transformer_blocks.") for n in adapter.modules):
        return False
    return any((m := _DOUBLE_INDEX.match(n)) and int(m.group(1)) >= 19 and mod.in_features == 3072
               for n, mod in adapter.modules.items())


FAMILY = ModelFamily(
    name="qwen-image", display="Qwen-Image", kind="dit",
    help="diffusers / PEFT names (one layout: nothing to convert)",
    detect=((10, is_qwen_image),),
    diffusers_class="QwenImageTransformer2DModel", blocks={"transformer_blocks": 60}, hidden=3072,
    block_lists=("transformer_blocks",),
)
