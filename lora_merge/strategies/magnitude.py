"""``magnitude-prune``: keep the largest-magnitude entries of the weighted sum."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy, Param
from .linear import present


def topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``int(density · numel)`` largest |entries| (PEFT's ``prune`` convention)."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    if k > 0:
        mask[torch.topk(t.abs().flatten(), k, sorted=False).indices] = True
    return mask.view_as(t)


def dense_sum(inputs: Sequence[LayerInput]) -> torch.Tensor:
    x = inputs[0]
    total = x.up.new_zeros(x.up.shape[0], x.down.shape[1])
    for x in present(inputs):
        total += x.delta()
    return total


@register
class MagnitudePrune(MergeStrategy):
    name = "magnitude-prune"
    description = "Weighted sum, then keep only the top-density fraction of its entries by magnitude."
    reference = "magnitude pruning of task vectors (cf. PEFT add_weighted_adapter 'magnitude_prune')"
    exact = False
    params = (Param("density", float, 0.5, "fraction of ΔW entries kept", range=(0.0, 1.0)),)

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        total = dense_sum(inputs)
        mask = topk_mask(total, self.density)
        return LayerResult(dense=total * mask, info={"kept": int(mask.sum())})
