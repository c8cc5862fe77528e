"""FLUX.2: FLUX.1's native block names with SwiGLU MLPs (ratio 3), shared modulations and a single block's
``linear1`` fused in diffusers too; 8 double-stream and 48 single-stream blocks, hidden 6144.  Told from
FLUX.1 by names only it has or by shapes; the conversion is :mod:`lora_merge.formats.flux2`."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import ModelFamily, fused_layout_notes
from .flux import FAMILY as FLUX1

if TYPE_CHECKING:
    from ..adapter import Adapter

_OWN_NAMES = re.compile(r"^transformer\.(double_stream_modulation_(img|txt)\.|single_stream_modulation\.|"
                        r"time_guidance_embed\.|single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj$|"
                        r"transformer_blocks\.\d+\.(ff|ff_context)\.linear_(in|out)$)")
_LINEAR1 = re.compile(r"^transformer\.single_blocks\.\d+\.linear1$")
_MLP_IN = re.compile(r"^transformer\.double_blocks\.\d+\.(img|txt)_mlp\.0$")
_BLOCK = re.compile(r"^transformer\.(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)\.\d+\.")


def has_flux2_names(adapter: Adapter) -> bool:
    """Names only FLUX.2 has, or FLUX.1 names with FLUX.2's shapes (SwiGLU ratio-3 MLPs), or block
    modules of hidden size 6144 (FLUX.2 dev; no other family has it)."""
    for n, m in adapter.modules.items():
        if _OWN_NAMES.match(n):
            return True
        rows, cols = m.out_features, m.in_features
        if (_LINEAR1.match(n) and rows == 9 * cols) or (_MLP_IN.match(n) and rows == 6 * cols):
            return True
        if _BLOCK.match(n) and cols == 6144:
            return True
    return False


FAMILY = ModelFamily(
    name="flux2", display="FLUX.2", kind="dit",
    help="native (kohya / musubi-tuner, ComfyUI, ai-toolkit) and diffusers names, converted exactly",
    detect=((50, has_flux2_names),),
    diffusers_class="Flux2Transformer2DModel",
    blocks={"transformer_blocks": 8, "single_transformer_blocks": 48}, hidden=6144,
    block_lists=FLUX1.block_lists, block_display=FLUX1.block_display,
    layout="lora_merge.formats.flux2:LAYOUT", fused_layout="lora_merge.formats.flux2:FLUX2",
    layout_notes=fused_layout_notes("BFL checkpoint names, fused img/txt qkv (single-block linear1 is one "
                                    "module in both layouts)"),
)
