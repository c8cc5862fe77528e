"""``linear``: the exact weighted sum by rank concatenation (algorithms.md §2)."""

from __future__ import annotations

from collections.abc import Sequence

from .. import linalg
from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy


def present(inputs: Sequence[LayerInput]) -> list[LayerInput]:
    """Inputs that contribute to this layer (present, non-zero coefficient)."""
    return [x for x in inputs if x.present and x.coeff != 0.0 and x.rank > 0]


def concat(inputs: Sequence[LayerInput]) -> tuple:
    """``(B, A)`` with ``B A = Σ w_i s_i B_i A_i`` exactly; rank Σ r_i of the contributing inputs."""
    xs = present(inputs)
    if not xs:
        x = inputs[0]
        return x.up.new_zeros(x.up.shape[0], 0), x.down.new_zeros(0, x.down.shape[1])
    return linalg.concat_factors([x.up for x in xs], [x.down for x in xs], [x.coeff for x in xs])


@register
class Linear(MergeStrategy):
    name = "linear"
    description = "Exact weighted sum Σ w_i·s_i·B_i·A_i by concatenating the factors (rank Σ r_i)."
    reference = "algorithms.md §2; what stacking the LoRAs at inference does"
    exact = True

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        up, down = concat(inputs)
        return LayerResult(up=up, down=down)
