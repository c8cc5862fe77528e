"""Z-Image's layout conversion: the original (native) names ↔ diffusers' ``ZImageTransformer2DModel`` ones.

The family's facts — block lists, the name tables (:data:`~lora_merge.families.zimage.BLOCK`,
:data:`~lora_merge.families.zimage.TOP`), detection, the kohya dialect's layout — are data in
:mod:`lora_merge.families.zimage`; this module builds the exact split and fuse on them
(:class:`.fused.FusedLayout`).  No halves are swapped: diffusers' Z-Image checkpoint converter renames
the final modulation as it is (``convert_z_image_transformer_checkpoint_to_diffusers``).
"""
from __future__ import annotations

from ..adapter import Adapter
from ..families.zimage import BLOCK, BLOCK_LISTS, FAMILY, TOP, has_zimage_names
from .fused import FusedLayout
from .layout import Layout

__all__ = ["LAYOUT", "ZIMAGE", "has_zimage_names", "which_layout"]

ZIMAGE = FusedLayout(family=FAMILY.name, blocks={h: (h, BLOCK) for h in BLOCK_LISTS},
                     top=TOP, units={"attention.qkv": (1, 1, 1)}, swaps=lambda native, rows, cols: False)


def which_layout(adapter: Adapter) -> str | None:
    if not has_zimage_names(adapter):
        return None
    nat = any(ZIMAGE.is_native(n) for n in adapter.modules)
    dif = any(ZIMAGE.is_diffusers(n) for n in adapter.modules)
    return "mixed" if nat and dif else "native" if nat else "diffusers"


LAYOUT = Layout(family=FAMILY.name, detect=which_layout, to_native=ZIMAGE.to_native,
                to_diffusers=ZIMAGE.to_diffusers, describe=FAMILY.layout_notes, dialect_layout=FAMILY.dialect_layout)
