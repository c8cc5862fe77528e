"""``magnitude-prune``: keep the largest-magnitude entries of the weighted sum."""

from __future__ import annotations

from collections.abc import Sequence

from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy, Param
from .taskvectors import dense_sum, topk_mask


@register
class MagnitudePrune(MergeStrategy):
    name = "magnitude-prune"
    description = "Weighted sum, then keep only the top-density fraction of its entries by magnitude."
    reference = "magnitude pruning of task vectors (cf. PEFT add_weighted_adapter 'magnitude_prune')"
    exact = False
    params = (Param("density", float, 0.5, "fraction of ΔW entries kept", range=(0.0, 1.0)),)

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        total = dense_sum(inputs)
        mask = topk_mask(total, self.config["density"])
        return LayerResult(dense=total * mask, info={"kept": int(mask.sum())})
