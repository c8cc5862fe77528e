"""``ties``: TIES-merging (trim, elect sign, disjoint mean) on each layer's dense ΔW."""

from __future__ import annotations

from collections.abc import Sequence

from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy, Param
from .taskvectors import disjoint_merge, prune, unweighted_taus, weighted_sum, zero_layer

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


class SparsifyThenCombine(MergeStrategy):
    """The task-arithmetic family (mergekit's generalized task arithmetic): each input's unweighted ΔW
    τ_i is sparsified (:meth:`sparsify`), then the weighted τ_i are combined by TIES sign election +
    disjoint mean (``ties``) or summed (``linear``), as :meth:`combination` says."""

    def sparsify(self, taus: list, inputs: Sequence[LayerInput], ctx: LayerContext) -> list:
        raise NotImplementedError

    def combination(self) -> str:
        return "ties"

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        taus, weights = unweighted_taus(inputs)
        if not taus:
            return zero_layer(inputs)
        taus = self.sparsify(taus, inputs, ctx)
        if self.combination() == "ties":
            return LayerResult(dense=disjoint_merge(taus, weights, self.config["sign"], self.config["divide"]))  # elect, merge
        return LayerResult(dense=weighted_sum(taus, weights))


@register
class Ties(SparsifyThenCombine):
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

    def sparsify(self, taus: list, inputs: Sequence[LayerInput], ctx: LayerContext) -> list:
        return [prune(t, self.config["density"]) for t in taus]  # trim
