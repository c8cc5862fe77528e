"""Z-Image: 30 main blocks (``layers.N``) and two refiners of 2 blocks (``noise_refiner.N``,
``context_refiner.N``), hidden 3840 (``ZImageTransformer2DModel``).

Both layouts keep the block names; only the attention differs: natively ``attention.qkv`` (q, k and v
**fused**) and ``attention.out``, in diffusers ``attention.to_q`` / ``to_k`` / ``to_v`` and
``attention.to_out.0`` (:data:`BLOCK`); the final layer and the patch embedder carry the patch size in
diffusers (:data:`TOP`: patch 2 × 2, one frame, the released model).  ComfyUI reads the native names;
musubi-tuner writes kohya files with the **diffusers** names, so the kohya dialect writes Z-Image in the
diffusers layout (``dialect_layout``).  The exact split and fuse are :mod:`lora_merge.formats.zimage`'s,
the pipeline's prompt encoder and prediction :mod:`lora_merge.model_mode.dit_base`'s.
"""
from __future__ import annotations

import re

from . import ModelFamily, fused_layout_notes, names_match

BLOCK_LISTS = ("layers", "noise_refiner", "context_refiner")
#: native block module → its diffusers modules (several: fused, in row order), in every block list
BLOCK = {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
         "attention.out": ("attention.to_out.0",)}
#: native module outside the blocks → its diffusers module
TOP = {"final_layer.linear": "all_final_layer.2-1.linear",
       "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
       "x_embedder": "all_x_embedder.2-1"}
#: a module of the blocks (``transformer.layers.N`` alone would be any transformer's)
BLOCK_PATTERN = rf"transformer\.({'|'.join(BLOCK_LISTS)})\.\d+\.(attention|feed_forward|adaLN_modulation)\."
_NAMES = re.compile(rf"^({BLOCK_PATTERN}|transformer\.(all_final_layer|all_x_embedder|cap_embedder)\.)")


has_zimage_names = names_match(_NAMES, "Z-Image's block or top-level module names")


FAMILY = ModelFamily(
    name="z-image", display="Z-Image", kind="dit",
    help="original (ComfyUI: fused attention.qkv) and diffusers names (kohya files as musubi-tuner writes "
         "them), converted exactly; priors measure on a pipeline folder",
    detect=((30, has_zimage_names),),
    diffusers_class="ZImageTransformer2DModel",
    blocks={"layers": 30, "noise_refiner": 2, "context_refiner": 2}, hidden=3840,
    block_lists=BLOCK_LISTS, block_pattern=BLOCK_PATTERN,
    layout="lora_merge.formats.zimage:LAYOUT", fused_layout="lora_merge.formats.zimage:ZIMAGE",
    layout_notes=fused_layout_notes("original Z-Image names, fused attention.qkv", "attention.to_q / to_k / to_v",
                                   native_word="original"),
    dialect_layout={"kohya": "diffusers"},
    pipelines=("ZImagePipeline",), pipeline_loader="lora_merge.model_mode.dit_base:load_flow_pipeline",
)
