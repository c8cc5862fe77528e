"""Stable Diffusion 3 / 3.5: its MMDiT (native) module names and diffusers' ``SD3Transformer2DModel`` ones.

* **native** (Stability's checkpoint; what kohya sd-scripts ``networks/lora_sd3.py`` writes as
  ``lora_unet_joint_blocks_N_x_block_attn_qkv`` and ComfyUI reads as ``diffusion_model.joint_blocks.N…``):
  ``joint_blocks.N.{x_block,context_block}.attn.qkv`` (q, k and v **fused**), ``….attn.proj``,
  ``….mlp.fc1`` / ``fc2``, ``….adaLN_modulation.1``; SD3.5's second image attention
  ``x_block.attn2.{qkv,proj}``; ``x_embedder.proj``, ``context_embedder``, ``t_embedder.mlp.{0,2}``,
  ``y_embedder.mlp.{0,2}``, ``final_layer.{linear,adaLN_modulation.1}``.
* **diffusers**: ``transformer_blocks.N.attn.to_q/to_k/to_v/to_out.0`` (image stream),
  ``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out`` (text stream), ``attn2.…``, ``ff.net.{0.proj,2}``,
  ``ff_context.net.{0.proj,2}``, ``norm1.linear``, ``norm1_context.linear``, ``pos_embed.proj``,
  ``time_text_embed.{timestep,text}_embedder.linear_{1,2}``, ``proj_out``, ``norm_out.linear``.

The map is the one diffusers' own checkpoint converter applies
(``convert_sd3_transformer_checkpoint_to_diffusers``; ``tests/test_sd3.py`` runs it as an oracle).  Two
modulations order their output halves (shift, scale) natively and (scale, shift) in diffusers, so their up
rows are swapped: ``final_layer.adaLN_modulation.1`` ↔ ``norm_out.linear``, and the **last** block's
``context_block.adaLN_modulation.1`` ↔ ``norm1_context.linear`` (that block only conditions the image
stream: its text-stream modulation has 2 × hidden outputs instead of 6 ×, which is how a file without
the model's block count tells it apart).
"""
from __future__ import annotations

from .. import arch
from ..adapter import Adapter
from ..families.sd3 import FAMILY, has_diffusers_only_names, has_native_names
from .fused import FusedLayout
from .layout import Layout

__all__ = ["LAYOUT", "SD3", "diffusers_to_native", "has_diffusers_only_names", "has_native_names", "native_to_diffusers", "to_diffusers", "to_native"]

BLOCK = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}
TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
UNITS = {"x_block.attn.qkv": (1, 1, 1), "x_block.attn2.qkv": (1, 1, 1), "context_block.attn.qkv": (1, 1, 1)}


def _swaps(native: str, rows: int, cols: int) -> bool:
    if native.endswith("final_layer.adaLN_modulation.1"):
        return True
    # the last block's text-stream modulation: shift and scale only (AdaLayerNormContinuous in diffusers)
    return native.endswith("context_block.adaLN_modulation.1") and rows == 2 * cols


SD3 = FusedLayout(family=FAMILY.name, blocks={"joint_blocks": ("transformer_blocks", BLOCK)}, top=TOP, units=UNITS,
                  swaps=_swaps)

native_to_diffusers = SD3.native_to_diffusers
diffusers_to_native = SD3.diffusers_to_native
to_diffusers = SD3.to_diffusers
to_native = SD3.to_native

def which_layout(adapter: Adapter) -> str | None:
    """``"native"``, ``"diffusers"``, ``"mixed"`` or None (not an SD3 LoRA)."""
    nat = has_native_names(adapter)
    dif = any(SD3.is_diffusers(n) and n != "transformer.context_embedder" for n in adapter.modules) and (
        nat or arch.guess_arch(adapter) == "sd3")
    if nat and dif:
        return "mixed"
    return "native" if nat else "diffusers" if dif else None


LAYOUT = Layout(family=FAMILY.name, detect=which_layout, to_native=to_native, to_diffusers=to_diffusers,
                describe=FAMILY.layout_notes, dialect_layout=FAMILY.dialect_layout)
