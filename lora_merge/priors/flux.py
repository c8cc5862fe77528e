"""A published block-role table for FLUX.1: ``--priors flux-splitflux``.

DuoLoRA's priors come from a UNet's resolutions, which a DiT does not have.  For FLUX.1 (19 double-stream
and 38 single-stream blocks) this table encodes the block analysis of SplitFlux (Yang et al., "SplitFlux:
Learning to Decouple Content and Style from a Single Image", CVPR 2026, arXiv 2511.15258, §3): replacing
the prompt fed to one block at a time, and training one LoRA per block, they find that

* the double-stream blocks (their blocks 1–19) barely change the image → **neutral** here;
* the early single-stream blocks (their blocks 20–29, ``single_blocks.0``–``9``) control the content →
  **content**;
* the later single-stream blocks (their blocks 30–57, ``single_blocks.10``–``37``) govern the style →
  **style**.

Every rule has score 1 (the paper gives no per-block strength); modules outside the blocks (``img_in``,
``txt_in``, ``time_in``, ``final_layer``, …) are neutral.  Each rule names the block in both layouts
(native ``transformer.single_blocks.N`` and diffusers ``transformer.single_transformer_blocks.N``), so the
table applies whichever dialect the merge writes.  The paper's numbering counts blocks from 1 across both
streams; ``single_blocks.N`` is its block ``20 + N``.  The FLUX.1 family names the table
(:data:`lora_merge.families.flux.FAMILY` ``priors``), so it is found by name without importing this module.
"""
from __future__ import annotations

from .table import LayerPriors, PriorRule

__all__ = ["CONTENT_SINGLE_BLOCKS", "SPLITFLUX_SOURCE", "flux_splitflux"]

#: FLUX.1's single-stream blocks SplitFlux finds to carry content (its blocks 20–29); the rest carry style
CONTENT_SINGLE_BLOCKS = range(10)
_SINGLE_BLOCKS = 38
SPLITFLUX_SOURCE = ("SplitFlux (Yang et al., CVPR 2026, arXiv 2511.15258): FLUX.1 single-stream blocks 0-9 "
                    "content, 10-37 style, double-stream blocks neutral")


def flux_splitflux() -> LayerPriors:
    rules = []
    for i in range(_SINGLE_BLOCKS):
        role = "content" if i in CONTENT_SINGLE_BLOCKS else "style"
        for head in ("transformer.single_blocks", "transformer.single_transformer_blocks"):
            rules.append(PriorRule(f"{head}.{i}", role, 1.0))
    return LayerPriors(rules, "flux", SPLITFLUX_SOURCE, "neutral", name="flux-splitflux")
