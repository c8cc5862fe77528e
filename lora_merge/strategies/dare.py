"""``dare``: drop-and-rescale each layer's ΔW, then a linear or TIES combination."""

from __future__ import annotations

from collections.abc import Sequence

from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy, Param
from .taskvectors import contributing, dare_drop, disjoint_merge, unweighted_taus, weighted_sum, zero_layer
from .ties import DIVIDE, SIGN


@register
class Dare(MergeStrategy):
    name = "dare"
    description = "DARE: randomly drop 1−density of each ΔW's entries, rescale by 1/density, then combine."
    reference = "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)"
    exact = False
    params = (
        Param("density", float, 0.5, "probability of keeping each ΔW entry", range=(0.0, 1.0)),
        Param(
            "variant",
            str,
            "linear",
            "combine the dropped deltas by weighted sum (linear) or TIES "
            "sign election + disjoint mean (ties)",
            choices=("linear", "ties"),
        ),
        SIGN,
        DIVIDE,
    )

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        taus, weights = unweighted_taus(inputs)
        if not taus:
            return zero_layer(inputs)
        # one stream per input position, seeded from (seed, layer): reproducible and order-independent
        positions = contributing(inputs)
        taus = [dare_drop(t, self.density, ctx.generator(f"input{i}")) for t, i in zip(taus, positions)]
        if self.variant == "ties":
            return LayerResult(dense=disjoint_merge(taus, weights, self.sign, self.divide))
        return LayerResult(dense=weighted_sum(taus, weights))
