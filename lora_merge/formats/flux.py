"""FLUX.1: its two module layouts and the exact conversions between them.

* **native** (Black Forest Labs' original model; what kohya sd-scripts / musubi-tuner and ComfyUI files
  name): ``transformer.double_blocks.N.img_attn.qkv`` (q, k and v **fused** in one module),
  ``…single_blocks.N.linear1`` (q, k, v and the MLP input fused), ``…img_in``, ``…final_layer.linear`` …
* **diffusers** (``FluxTransformer2DModel``; diffusers and PEFT files):
  ``transformer.transformer_blocks.N.attn.to_q`` / ``to_k`` / ``to_v``,
  ``…single_transformer_blocks.N.attn.to_q`` … ``proj_mlp``, ``…x_embedder``, ``…proj_out`` …

The name tables (``DOUBLE``, ``SINGLE``, ``TOP``) are data in :mod:`lora_merge.families.flux`, with the
family's detection and facts; the exact split and fuse are :class:`.fused.FusedLayout`'s.
``final_layer.adaLN_modulation.1`` and ``norm_out.linear`` order their output halves differently
(shift/scale vs scale/shift, as diffusers' converters note); the up rows are swapped.
"""
from __future__ import annotations

from .. import arch
from ..adapter import Adapter
from ..families.flux import DOUBLE, FAMILY, SINGLE, TOP
from .fused import FusedLayout
from .layout import Layout

__all__ = ["DIFFUSERS_SUFFIXES", "DOUBLE", "FLUX", "LAYOUT", "NATIVE_HEADS", "SINGLE", "TOP", "diffusers_to_native",
           "native_to_diffusers", "to_diffusers", "to_native"]

P = "transformer."
SWAPPED = "final_layer.adaLN_modulation.1"
#: the relative output sizes of the parts of a fused module, in units of the hidden size (MLP ratio 4)
PART_UNITS = {"img_attn.qkv": (1, 1, 1), "txt_attn.qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)}

FLUX = FusedLayout(
    family=FAMILY.name,
    blocks={"double_blocks": ("transformer_blocks", DOUBLE), "single_blocks": ("single_transformer_blocks", SINGLE)},
    top=TOP, units=PART_UNITS, swaps=lambda native, rows, cols: native.endswith(SWAPPED),
    part_words={"qkv": "q, k, v", "linear1": "q, k, v and the MLP input"})
#: first path components of native Flux names (after ``transformer.``)
NATIVE_HEADS = FLUX.native_heads
DIFFUSERS_SUFFIXES = FLUX.diffusers_suffixes

native_to_diffusers = FLUX.native_to_diffusers
diffusers_to_native = FLUX.diffusers_to_native
is_native = FLUX.is_native
is_diffusers_flux = FLUX.is_diffusers
split_module = FLUX.split_module
to_diffusers = FLUX.to_diffusers
to_native = FLUX.to_native


# ---------------------------------------------------------------- detection
def which_layout(adapter: Adapter) -> str | None:
    """``"native"``, ``"diffusers"``, ``"mixed"`` or None (no Flux module names at all)."""
    nat = any(is_native(n) for n in adapter.modules)
    dif = any(n.startswith(P + "single_transformer_blocks.") for n in adapter.modules) or (
        arch.guess_arch(adapter) == "flux" and any(is_diffusers_flux(n) for n in adapter.modules))
    if nat and dif:
        return "mixed"
    return "native" if nat else "diffusers" if dif else None


def _claims(adapter: Adapter) -> str | None:
    return which_layout(adapter)


LAYOUT = Layout(family=FAMILY.name, detect=_claims, to_native=to_native, to_diffusers=to_diffusers,
                describe=FAMILY.layout_notes, dialect_layout=FAMILY.dialect_layout)
