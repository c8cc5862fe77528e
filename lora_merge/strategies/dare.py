"""``dare``: drop-and-rescale each layer's ΔW, then a linear or TIES combination."""

from __future__ import annotations

from collections.abc import Sequence

from . import register
from .base import LayerContext, LayerInput, Param
from .taskvectors import contributing, dare_drop
from .ties import DIVIDE, SIGN, SparsifyThenCombine


@register
class Dare(SparsifyThenCombine):
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

    def sparsify(self, taus: list, inputs: Sequence[LayerInput], ctx: LayerContext) -> list:
        # one stream per input position, seeded from (seed, layer): reproducible and order-independent
        return [dare_drop(t, self.config["density"], ctx.generator(f"input{i}")) for t, i in zip(taus, contributing(inputs))]

    def combination(self) -> str:
        return self.config["variant"]
