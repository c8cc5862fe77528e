"""FLUX.2: its native (Black Forest Labs) module names and diffusers' ``Flux2Transformer2DModel`` ones.

FLUX.2 keeps FLUX.1's block names (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1`` …), which
kohya/musubi (``lora_unet_double_blocks_0_img_attn_qkv``) and ComfyUI / ai-toolkit
(``diffusion_model.double_blocks.0.img_attn.qkv``) files use, but differs in what they hold:

* the MLPs are SwiGLU with ratio 3 (``img_mlp.0`` ↔ ``ff.linear_in`` has 6 × hidden outputs,
  ``img_mlp.2`` ↔ ``ff.linear_out``), and a single block's ``linear1`` (q, k, v and the MLP input,
  9 × hidden outputs) stays **fused** in diffusers too (``attn.to_qkv_mlp_proj``), as does ``linear2``
  (``attn.to_out``);
* the modulations are shared by all blocks: ``double_stream_modulation_img.lin`` /
  ``double_stream_modulation_txt.lin`` / ``single_stream_modulation.lin`` ↔ ``….linear``; there is no
  per-block ``img_mod`` / ``modulation``;
* the embedders are ``time_guidance_embed.{timestep,guidance}_embedder.linear_{1,2}``.

Only the double blocks' ``img_attn.qkv`` / ``txt_attn.qkv`` are split (exact, :mod:`.fused`).
``final_layer.adaLN_modulation.1`` ↔ ``norm_out.linear`` swaps its halves, as diffusers' FLUX.2
*checkpoint* converter does (``convert_flux2_transformer_checkpoint_to_diffusers``); diffusers' FLUX.2 *LoRA*
converter (0.42) renames that module without the swap, so a LoRA on it loads with shift and scale exchanged
there — ours keeps the model's meaning.  FLUX.2 is told from FLUX.1 by names only it has, or by shapes
(``linear1`` 9 × its input, ``img_mlp.0`` 6 ×, or hidden size 6144: the family's rule,
:func:`lora_merge.families.flux2.has_flux2_names`); ``--arch flux2`` forces it.
"""
from __future__ import annotations

from .. import arch
from ..adapter import Adapter
from ..families.flux2 import FAMILY, has_flux2_names
from .fused import FusedLayout
from .layout import Layout

__all__ = ["FLUX2", "LAYOUT", "has_flux2_names", "which_layout"]

DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.linear_in",),
    "img_mlp.2": ("ff.linear_out",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.linear_in",),
    "txt_mlp.2": ("ff_context.linear_out",),
}
SINGLE = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}

FLUX2 = FusedLayout(
    family=FAMILY.name,
    blocks={"double_blocks": ("transformer_blocks", DOUBLE), "single_blocks": ("single_transformer_blocks", SINGLE)},
    top=TOP, units={"img_attn.qkv": (1, 1, 1), "txt_attn.qkv": (1, 1, 1)},
    swaps=lambda native, rows, cols: native.endswith("final_layer.adaLN_modulation.1"))

def which_layout(adapter: Adapter) -> str | None:
    if arch.guess_arch(adapter) != "flux2":
        return None
    nat = any(FLUX2.is_native(n) for n in adapter.modules)
    dif = any(FLUX2.is_diffusers(n) for n in adapter.modules)
    return "mixed" if nat and dif else "native" if nat else "diffusers" if dif else None


LAYOUT = Layout(family=FAMILY.name, detect=which_layout, to_native=FLUX2.to_native, to_diffusers=FLUX2.to_diffusers,
                describe=FAMILY.layout_notes, dialect_layout=FAMILY.dialect_layout)
