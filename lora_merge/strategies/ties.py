"""``ties``: TIES-merging (trim, elect sign, disjoint mean) on each layer's dense ΔW."""

from __future__ import annotations

from collections.abc import Sequence

from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy, Param
from .taskvectors import disjoint_merge, prune, unweighted_taus, zero_layer

SIGN = Param(
    "sign",
    str,
    "weighted",
    "sign election on the weighted deltas w_i·τ_i (mergekit) or the unweighted τ_i (PEFT)",
    choices=("weighted", "unweighted"),
)
DIVIDE = Param(
    "divide",
    str,
    "count",
    "disjoint mean: divide Σ w_i·τ_i over agreeing inputs by their "
    "count (paper, PEFT), by their weight sum (mergekit normalize) or not at all (none)",
    choices=("count", "weights", "none"),
)


@register
class Ties(MergeStrategy):
    name = "ties"
    description = "TIES: trim each ΔW to its top-density entries, elect signs, average the agreeing ones."
    reference = "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)"
    exact = False
    params = (
        Param(
            "density", float, 0.5, "fraction of each input's ΔW entries kept by the trim", range=(0.0, 1.0)
        ),
        SIGN,
        DIVIDE,
    )

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        taus, weights = unweighted_taus(inputs)
        if not taus:
            return zero_layer(inputs)
        taus = [prune(t, self.density) for t in taus]  # trim
        return LayerResult(dense=disjoint_merge(taus, weights, self.sign, self.divide))  # elect, merge
