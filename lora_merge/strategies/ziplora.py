"""``ziplora``: one merge coefficient per output (or input) dimension of each LoRA, solved from the two
files alone (``--mode weights``) or trained through the diffusion model (``--mode model``).

Input 1 is the content LoRA, input 2 the style LoRA; the shared machinery is in
:mod:`lora_merge.strategies.pair_masks`.  See docs/ziplora-duolora.md.
"""
from __future__ import annotations

from ..masks import MaskObjective
from . import register
from .base import MergePlan, Param
from .pair_masks import INPUT_PARAMS, REFINE_PARAMS, STRENGTH_PARAM, ZIPLORA_MODEL_PARAMS, PairMaskStrategy


@register
class ZipLoRA(PairMaskStrategy):
    name = "ziplora"
    description = ("ZipLoRA from the two files alone: a content and a style coefficient per output dimension, "
                   "closed form + Adam on the per-layer weight-space objective.")  # fmt: skip
    reference = "Shah et al., ZipLoRA, arXiv 2311.13600 (ECCV 2024); docs/algorithms.md §5, §8"
    exact = False
    params = (
        Param("axis", str, "out", "mask over output dimensions (paper) or input dimensions (public code)",
              choices=("out", "in")),
        Param("lambda_sim", float, 0.01, "weight of the similarity term mean|m_c·m_s|", range=(0.0, None)),
        Param("closed_form", bool, True, "start from the closed-form minimizer of the quadratic part "
              "(off: start from all-ones masks, as the paper)"),
        STRENGTH_PARAM,
        *REFINE_PARAMS,
        *INPUT_PARAMS,
        *ZIPLORA_MODEL_PARAMS,
    )  # fmt: skip

    def mask_objective(self, plan: MergePlan | None = None) -> MaskObjective:
        """Reconstruction of both LoRAs plus the similarity term; no priors, no Constyle."""
        return MaskObjective(axis=self.config["axis"], lambda_sim=float(self.config["lambda_sim"]),
                             **self.refine_settings())
