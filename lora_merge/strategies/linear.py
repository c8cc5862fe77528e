"""``linear``: the exact weighted sum by rank concatenation (algorithms.md §2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy


def present(inputs: Sequence[LayerInput]) -> list[LayerInput]:
    """Inputs that contribute to this layer (present, non-zero coefficient)."""
    return [x for x in inputs if x.present and x.coeff != 0.0 and x.rank > 0]


def concat(inputs: Sequence[LayerInput]) -> tuple:
    """``(B, A)`` with ``B A = Σ w_i s_i B_i A_i`` exactly; rank Σ r_i of the contributing inputs.

    Same result as :func:`lora_merge.linalg.concat_factors`, written into preallocated outputs (one copy
    per factor instead of two; this is the hot loop of a linear merge)."""
    xs = present(inputs)
    x0 = inputs[0]
    d_out, d_in = x0.up.shape[0], x0.down.shape[1]
    total = sum(x.rank for x in xs)
    up = x0.up.new_empty(d_out, total, dtype=torch.float32)
    down = x0.down.new_empty(total, d_in, dtype=torch.float32)
    o = 0
    for x in xs:
        up[:, o : o + x.rank] = x.up
        torch.mul(x.down, x.coeff, out=down[o : o + x.rank])
        o += x.rank
    return up, down


@register
class Linear(MergeStrategy):
    name = "linear"
    description = "Exact weighted sum Σ w_i·s_i·B_i·A_i by concatenating the factors (rank Σ r_i)."
    reference = "algorithms.md §2; what stacking the LoRAs at inference does"
    exact = True

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        up, down = concat(inputs)
        return LayerResult(up=up, down=down)
