"""FLUX.1: native (Black Forest Labs) names ``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1`` …
(q, k, v fused) and diffusers' ``transformer_blocks.N.attn.to_q``, ``single_transformer_blocks.N…``; 19
double-stream and 38 single-stream blocks.  The name tables are here (detection reads them); the exact
split and fuse are :mod:`lora_merge.formats.flux`'s."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from . import ModelFamily, fused_layout_notes
from .qwen_image import is_qwen_image

if TYPE_CHECKING:
    from ..adapter import Adapter

#: native double-block module → its diffusers modules (several: fused, in row order)
DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
#: native module outside the blocks → its diffusers module
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}

_NATIVE_BLOCK = re.compile(r"^transformer\.(double_blocks|single_blocks)\.\d+\.(.+)$")
_DIFFUSERS_DOUBLE_ATTN = re.compile(r"^transformer\.transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj)$")


def is_native_name(name: str) -> bool:
    """A module name of FLUX.1's native layout (the tables above)."""
    m = _NATIVE_BLOCK.match(name)
    if m:
        return m.group(2) in (DOUBLE if m.group(1) == "double_blocks" else SINGLE)
    return name.startswith("transformer.") and name[len("transformer."):] in TOP


def is_flux(adapter: Adapter) -> bool:
    names = adapter.modules
    if any(is_native_name(n) or n.startswith("transformer.single_transformer_blocks.") for n in names):
        return True
    if any("guidance_embedder" in n for n in names):
        return True
    # double blocks only: Flux and SD3 share these names; Flux's hidden size is 3072 (SD3.5 large 2432,
    # SD3/3.5 medium 1536)
    return not is_qwen_image(adapter) and any(_DIFFUSERS_DOUBLE_ATTN.match(n) and m.in_features == 3072
                                              for n, m in names.items())


def has_flux_block_names(adapter: Adapter) -> bool:
    """Flux's block list names anywhere in a path (a LoRA no stricter rule claimed)."""
    return any("single_transformer_blocks" in n or "double_blocks" in n for n in adapter.modules)


FAMILY = ModelFamily(
    name="flux", display="FLUX.1", kind="dit",
    help="native (kohya / musubi-tuner, ComfyUI, XLabs: fused qkv and linear1) and diffusers names, "
         "converted exactly; SplitFlux's block table; priors measure on a pipeline folder",
    detect=((60, is_flux), (70, has_flux_block_names)),
    diffusers_class="FluxTransformer2DModel",
    blocks={"transformer_blocks": 19, "single_transformer_blocks": 38}, hidden=3072,
    block_lists=("transformer_blocks", "single_transformer_blocks", "double_blocks", "single_blocks"),
    block_display={"double_blocks": "double", "transformer_blocks": "double", "single_blocks": "single",
                   "single_transformer_blocks": "single"},
    layout="lora_merge.formats.flux:LAYOUT", fused_layout="lora_merge.formats.flux:FLUX",
    layout_notes=fused_layout_notes("BFL checkpoint names, fused img/txt qkv and single-block linear1"),
    priors={"flux-splitflux": "lora_merge.priors.flux:flux_splitflux"},
    pipelines=("FluxPipeline",), pipeline_loader="lora_merge.model_mode.dit_base:load_flow_pipeline",
)
