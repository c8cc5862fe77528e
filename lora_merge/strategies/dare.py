"""``dare``: drop-and-rescale each layer's ΔW, then a linear or TIES combination."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy, Param
from .ties import DIVIDE, SIGN, disjoint_merge, unweighted_taus, zero_layer


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale kept ones by ``1/density``."""
    if density <= 0.0:
        return torch.zeros_like(tau)
    if density >= 1.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, device=tau.device, dtype=torch.float32) < density
    return tau * keep / density


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
        idx = [i for i, x in enumerate(inputs) if x.present and x.coeff != 0.0 and x.rank > 0]
        taus = [dare_drop(t, self.density, ctx.generator(f"input{i}")) for t, i in zip(taus, idx)]
        if self.variant == "ties":
            return LayerResult(dense=disjoint_merge(taus, weights, self.sign, self.divide))
        total = taus[0] * weights[0]
        for t, w in zip(taus[1:], weights[1:]):
            total = total + t * w
        return LayerResult(dense=total)
