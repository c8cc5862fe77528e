"""Architecture facts of DiT families (FLUX.1, FLUX.2, SD3/3.5, Wan 2.x, Qwen-Image) and their detection.

The block counts and hidden sizes are those of the diffusers model classes' default configs
(``FluxTransformer2DModel``: 19 double-stream and 38 single-stream blocks, hidden 3072;
``Flux2Transformer2DModel``: 8 double-stream and 48 single-stream blocks, hidden 6144;
``ZImageTransformer2DModel``: 30 layers and 2 + 2 refiner blocks, hidden 3840;
``SD3Transformer2DModel``; ``WanTransformer3DModel``: 40 blocks, hidden 5120 (14B);
``QwenImageTransformer2DModel``: 60 blocks, hidden 3072).  ``tests/test_dit_arch.py`` builds each class
on the meta device (no weights) and checks these numbers and every module name the dialects use.
:func:`family_summary` is what ``inspect`` shows for a DiT LoRA: family, blocks touched, layout.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .. import arch
from ..adapter import Adapter
from . import flux, flux2, sd3, wan, zimage
from .layout import layout_of

__all__ = ["FAMILIES", "FUSED_LAYOUTS", "DitFacts", "family_summary", "meta_model"]


@dataclass(frozen=True)
class DitFacts:
    name: str
    display: str
    diffusers_class: str
    #: block list name → number of blocks in the default (full-size) config
    blocks: dict[str, int]
    hidden: int


FAMILIES: dict[str, DitFacts] = {
    "flux": DitFacts("flux", "FLUX.1", "FluxTransformer2DModel",
                     {"transformer_blocks": 19, "single_transformer_blocks": 38}, 3072),
    "flux2": DitFacts("flux2", "FLUX.2", "Flux2Transformer2DModel",
                      {"transformer_blocks": 8, "single_transformer_blocks": 48}, 6144),
    "sd3": DitFacts("sd3", "Stable Diffusion 3 / 3.5", "SD3Transformer2DModel", {"transformer_blocks": 18}, 1152),
    "wan": DitFacts("wan", "Wan 2.x", "WanTransformer3DModel", {"blocks": 40}, 5120),
    "z-image": DitFacts("z-image", "Z-Image", "ZImageTransformer2DModel",
                        {"layers": 30, "noise_refiner": 2, "context_refiner": 2}, 3840),
    "qwen-image": DitFacts("qwen-image", "Qwen-Image", "QwenImageTransformer2DModel",
                           {"transformer_blocks": 60}, 3072),
}

_WAN = re.compile(r"^transformer\.blocks\.\d+\.(self_attn|cross_attn|attn1|attn2|ffn)\.")
_QWEN = re.compile(r"^transformer\.transformer_blocks\.\d+\.(img_mlp|txt_mlp|img_mod|txt_mod)\.")
_FLUX_DIFF_DOUBLE = re.compile(r"^transformer\.transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj)$")


_DOUBLE_INDEX = re.compile(r"^transformer\.transformer_blocks\.(\d+)\.attn\.")


def _is_qwen(ad: Adapter) -> bool:
    """Qwen-Image's own module names, or attention of hidden size 3072 in a block FLUX.1 does not have (≥ 19)."""
    if any(_QWEN.match(n) for n in ad.modules):
        return True
    if any(n.startswith("transformer.single_transformer_blocks.") for n in ad.modules):
        return False
    return any((m := _DOUBLE_INDEX.match(n)) and int(m.group(1)) >= 19 and mod.in_features == 3072
               for n, mod in ad.modules.items())


def _is_wan(ad: Adapter) -> bool:
    return any(_WAN.match(n) for n in ad.modules)


def _is_sd3(ad: Adapter) -> bool:
    """SD3's MMDiT names (``joint_blocks``, ``t_embedder`` …) or diffusers names only SD3 has
    (``pos_embed.proj``, SD3.5's ``attn2``); SD3 LoRAs of the shared double-block names are told apart from
    Flux by their hidden size (see :func:`_is_flux`) and fall back to ``arch.guess_arch``'s rule."""
    return sd3.has_native_names(ad) or sd3.has_diffusers_only_names(ad)


def _is_flux(ad: Adapter) -> bool:
    names = ad.modules
    if any(flux.is_native(n) or n.startswith("transformer.single_transformer_blocks.") for n in names):
        return True
    if any("guidance_embedder" in n for n in names):
        return True
    # double blocks only: Flux and SD3 share these names; Flux's hidden size is 3072 (SD3.5 large 2432,
    # SD3/3.5 medium 1536)
    return not _is_qwen(ad) and any(_FLUX_DIFF_DOUBLE.match(n) and m.in_features == 3072
                                    for n, m in names.items())


for _name, _detect in (("qwen-image", _is_qwen), ("wan", _is_wan), ("z-image", zimage.has_zimage_names), ("sd3", _is_sd3),
                      ("flux2", flux2.has_flux2_names),
                      ("flux", _is_flux)):
    arch.register_arch(_name, FAMILIES[_name].display, detect=_detect)


def meta_model(family: str, **config):
    """The family's diffusers model built on the meta device from its default config (``config``
    overrides fields); no weights are read or allocated.  Needs diffusers and accelerate."""
    import accelerate
    import diffusers

    cls = getattr(diffusers, FAMILIES[family].diffusers_class)
    with accelerate.init_empty_weights():
        return cls(**config)


_DISPLAY_LIST = {"double_blocks": "double", "transformer_blocks": "double", "single_blocks": "single",
                 "single_transformer_blocks": "single", "blocks": "blocks"}
#: families whose native layout fuses q, k and v (inspect says "fused" / "split")
_FUSED = {"flux": flux.LAYOUT, "flux2": flux2.LAYOUT, "sd3": sd3.LAYOUT, "z-image": zimage.LAYOUT}
#: their name maps (block twins for measured priors: ``transformer_blocks.3`` ↔ ``double_blocks.3``)
FUSED_LAYOUTS = {"flux": flux.FLUX, "flux2": flux2.FLUX2, "sd3": sd3.SD3, "z-image": zimage.ZIMAGE}


def family_summary(adapter: Adapter, family: str | None = None) -> dict | None:
    """``{"family", "blocks": {"double": n, …}, "layout", "layout_note"}`` for a DiT LoRA, else None."""
    family = family or arch.guess_arch(adapter)
    if family not in FAMILIES:
        return None
    touched: dict[str, set[int]] = {}
    for n in adapter.modules:
        m = arch.DIT_BLOCK_RE.match(n)
        if m:
            lst = (_DISPLAY_LIST[m.group(2)] if family in ("flux", "flux2") else
                   "transformer_blocks" if m.group(2) == "joint_blocks" else m.group(2))
            touched.setdefault(lst, set()).add(int(m.group(3)))
    lay = layout_of(adapter)
    out = {"family": family, "family_name": FAMILIES[family].display,
           "blocks": {k: len(v) for k, v in sorted(touched.items())},
           "blocks_in_model": dict(FAMILIES[family].blocks)}
    if family in _FUSED:
        kind = lay[1] if lay and lay[0] == family else "diffusers"
        out["layout"] = kind
        out["attention"] = {"native": "fused", "diffusers": "split", "mixed": "mixed"}[kind]
        out["layout_note"] = _FUSED[family].describe[kind]
    elif lay is not None and lay[0] == family:
        out["layout"] = lay[1]
        out["attention"] = "split"
        out["layout_note"] = wan.LAYOUT.describe[lay[1]] if family == "wan" else lay[1]
    return out
