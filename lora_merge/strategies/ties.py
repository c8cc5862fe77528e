"""``ties``: TIES-merging (trim, elect sign, disjoint mean) on each layer's dense ΔW."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy, Param
from .linear import present
from .magnitude import topk_mask

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


def disjoint_merge(taus: list[torch.Tensor], weights: list[float], sign: str, divide: str) -> torch.Tensor:
    """Elect a sign per entry and combine the agreeing (non-zero, same-sign) weighted entries."""
    stack = torch.stack(taus)
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.dim() - 1)))
    weighted = stack * w
    basis = weighted if sign == "weighted" else stack
    elected = torch.sign(basis.sum(0))
    agree = (torch.sign(basis) == elected) & (basis != 0)  # agreement judged where the vote was taken
    total = (weighted * agree).sum(0)
    if divide == "count":
        total = total / agree.sum(0).clamp_min(1)
    elif divide == "weights":
        wsum = (w * agree).sum(0)
        total = torch.where(wsum != 0, total / torch.where(wsum != 0, wsum, torch.ones_like(wsum)), 0.0)
    return total


def zero_layer(inputs: Sequence[LayerInput]) -> LayerResult:
    """The result for a layer where no input contributes (all weights 0 or modules absent)."""
    x = inputs[0]
    return LayerResult(dense=x.up.new_zeros(x.up.shape[0], x.down.shape[1]))


def unweighted_taus(inputs: Sequence[LayerInput]) -> tuple[list[torch.Tensor], list[float]]:
    xs = present(inputs)
    return [x.unweighted_delta() for x in xs], [x.weight for x in xs]


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
        taus = [t * topk_mask(t, self.density) for t in taus]
        return LayerResult(dense=disjoint_merge(taus, weights, self.sign, self.divide))
