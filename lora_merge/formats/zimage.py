"""Z-Image: its original (native) module names and diffusers' ``ZImageTransformer2DModel`` ones.

The main blocks (``layers.N``) and the two refiners (``noise_refiner.N``, ``context_refiner.N``) keep
their names in both layouts, except the attention: natively ``attention.qkv`` (q, k and v **fused**) and
``attention.out``, in diffusers ``attention.to_q`` / ``to_k`` / ``to_v`` and ``attention.to_out.0``;
``feed_forward.w1/w2/w3``, ``adaLN_modulation.0``, ``t_embedder.mlp.{0,2}`` and ``cap_embedder.1`` are
the same.  The final layer and the patch embedder carry the patch size in diffusers
(``final_layer.*`` ↔ ``all_final_layer.2-1.*``, ``x_embedder`` ↔ ``all_x_embedder.2-1``, patch 2 × 2, one
frame: the released model).  No halves are swapped: diffusers' Z-Image checkpoint converter renames the
final modulation as it is (``convert_z_image_transformer_checkpoint_to_diffusers``).

ComfyUI reads the native names (``diffusion_model.layers.0.attention.qkv``); musubi-tuner writes kohya
files with the **diffusers** names (``lora_unet_layers_0_attention_to_q``), so the kohya dialect writes
Z-Image in the diffusers layout (:attr:`Layout.dialect_layout`).
"""
from __future__ import annotations

import re

from ..adapter import Adapter
from .fused import FusedLayout
from .layout import Layout, register_layout

__all__ = ["ZIMAGE", "has_zimage_names", "which_layout"]

BLOCK = {"attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
         "attention.out": ("attention.to_out.0",)}
TOP = {"final_layer.linear": "all_final_layer.2-1.linear",
       "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
       "x_embedder": "all_x_embedder.2-1"}
ZIMAGE = FusedLayout(family="z-image",
                     blocks={h: (h, BLOCK) for h in ("layers", "noise_refiner", "context_refiner")},
                     top=TOP, units={"attention.qkv": (1, 1, 1)}, swaps=lambda native, rows, cols: False)

_HEADS = re.compile(r"^transformer\.((layers|noise_refiner|context_refiner)\.\d+\.(attention|feed_forward|"
                    r"adaLN_modulation)\.|all_final_layer\.|all_x_embedder\.|cap_embedder\.)")


def has_zimage_names(adapter: Adapter) -> bool:
    return any(_HEADS.match(n) for n in adapter.modules)


def which_layout(adapter: Adapter) -> str | None:
    if not has_zimage_names(adapter):
        return None
    nat = any(ZIMAGE.is_native(n) for n in adapter.modules)
    dif = any(ZIMAGE.is_diffusers(n) for n in adapter.modules)
    return "mixed" if nat and dif else "native" if nat else "diffusers"


LAYOUT = register_layout(Layout(
    family="z-image", detect=which_layout, to_native=ZIMAGE.to_native, to_diffusers=ZIMAGE.to_diffusers,
    describe={"native": "original Z-Image names, fused attention.qkv",
              "diffusers": "diffusers names, split attention.to_q / to_k / to_v",
              "mixed": "both original (fused) and diffusers (split) names"},
    dialect_layout={"kohya": "diffusers"}))
