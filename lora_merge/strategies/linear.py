"""``linear``: the exact weighted sum by rank concatenation (docs/algorithms.md §2).

Besides :meth:`Linear.merge_layer` (fp32 factors in, fp32 factors out), ``linear`` offers the engine a
:meth:`~Linear.direct_kernel` for CPU merges: the output modules are written straight from the stored
factors into the output dtype (:class:`ExactConcat`), or re-factored to ``--rank K`` straight from each
input's factors (:class:`SumRefactor`).  Both give the same result as the general path.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from .. import linalg
from ..adapter import LoraModule
from . import register
from .base import LayerContext, LayerInput, LayerResult, MergePlan, MergeStrategy, PlannedLayer


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


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class ExactConcat:
    """``linear`` without re-factorization, written straight into the output dtype.

    Bit-identical to the general path (fp32 factors → :func:`concat` → cast): B is copied (fp16/bf16 →
    fp32 is exact, so one cast to the output dtype rounds once); each ``A_i`` is widened into a reused
    fp32 scratch buffer, multiplied by its coefficient in fp32 (the scale applied once, the same
    ``fp32 × scalar`` operation) and then cast.  No per-layer fp32 buffers, no second copy.
    """

    heavy = False  # a copy; not worth a worker thread

    def __init__(self, plan: MergePlan, out_dtype: torch.dtype):
        self.adapters = list(plan.adapters)
        self.out_dtype = out_dtype
        self._local = threading.local()  # one scratch buffer per worker thread

    def _buffer(self, n: int) -> torch.Tensor:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.numel() < n:
            scratch = self._local.scratch = torch.empty(n, dtype=torch.float32)
        return scratch[:n]

    def parts(self, layer: PlannedLayer) -> list[tuple[LoraModule, float]] | None:
        """The contributing ``(module, coefficient)`` pairs of a layer, or None when one has an odd dtype."""
        parts = []
        for ad, w in zip(self.adapters, layer.coeffs):
            m = ad.modules.get(layer.ctx.name)
            if m is None or m.rank == 0:
                continue
            coeff = w * m.scale  # LayerInput.coeff
            if coeff == 0.0:
                continue
            if m.down.dtype not in _FLOATS or m.up.dtype not in _FLOATS:
                return None
            parts.append((m, coeff))
        return parts

    def applies(self, layer: PlannedLayer) -> bool:
        return self.out_dtype in _FLOATS and bool(self.parts(layer))

    def layer(self, layer: PlannedLayer) -> tuple[LoraModule, bool]:
        parts = self.parts(layer)
        name, ws = layer.ctx.name, layer.ctx.weight_shape
        d_out, d_in = int(ws[0]), int(torch.Size(ws[1:]).numel())
        total = sum(m.rank for m, _ in parts)
        up = torch.empty(d_out, total, dtype=self.out_dtype)
        down = torch.empty(total, d_in, dtype=self.out_dtype)
        o = 0
        for m, coeff in parts:
            r = m.rank
            b = m.up.load(check=False).reshape(d_out, r)  # the engine checks the output (see DirectKernel)
            a = m.down.load(check=False).reshape(r, d_in)
            if b.dtype == self.out_dtype or b.dtype == torch.float32 or self.out_dtype == torch.float32:
                up[:, o : o + r].copy_(b)
            else:  # e.g. bf16 → fp16: widen first, so the one rounding is the fp32 → output cast
                up[:, o : o + r].copy_(b.float())
            if self.out_dtype == torch.float32:
                dst = down[o : o + r]
                dst.copy_(a)
                dst.mul_(coeff)
            else:
                tmp = self._buffer(r * d_in).view(r, d_in)
                tmp.copy_(a)
                tmp.mul_(coeff)
                down[o : o + r].copy_(tmp)
            o += r
        if len(ws) == 4:
            down = down.reshape(total, *ws[1:])
            up = up.reshape(ws[0], total, 1, 1)
        return LoraModule.from_tensors(name, down, up, alpha=float(total)), False


class SumRefactor(ExactConcat):
    """``linear`` with ``--rank K``: :func:`lora_merge.linalg.refactor_sum` straight from each input's
    factors (no concatenated or scaled fp32 copies); layers whose exact rank is at most K are concatenated
    exactly, as the general path does."""

    heavy = True  # a re-factorization

    def __init__(self, plan: MergePlan, out_dtype: torch.dtype, tol: float):
        super().__init__(plan, out_dtype)
        self.rank, self.tol = int(plan.rank), tol
        self.infos: dict[str, dict] = {}

    def layer(self, layer: PlannedLayer) -> tuple[LoraModule, bool]:
        parts = self.parts(layer)
        if sum(m.rank for m, _ in parts) <= self.rank:
            return super().layer(layer)
        ws = layer.ctx.weight_shape
        d_out, d_in = int(ws[0]), int(torch.Size(ws[1:]).numel())
        ups = [m.up.load().reshape(d_out, m.rank) for m, _ in parts]
        downs = [m.down.load().reshape(m.rank, d_in) for m, _ in parts]
        coeffs = [c for _, c in parts]
        up, down, rel, norm = linalg.refactor_sum(ups, downs, coeffs, self.rank, tol=self.tol, with_error=True)
        self.infos[layer.ctx.name] = {"truncation_rank_rule": f"--rank {self.rank}", "truncation_rel_error": rel,
                                      "truncation_norm": norm}  # fmt: skip
        return LoraModule.from_factors(layer.ctx.name, up, down, ws, self.out_dtype), True

    def layer_info(self, layer: PlannedLayer) -> dict:
        """What the re-factorization of ``layer`` lost (the engine adds it to the layer's report)."""
        return self.infos.pop(layer.ctx.name, {})


@register
class Linear(MergeStrategy):
    name = "linear"
    description = "Exact weighted sum Σ w_i·s_i·B_i·A_i by concatenating the factors (rank Σ r_i)."
    reference = "docs/algorithms.md §2; what stacking the LoRAs at inference does"
    exact = True

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        up, down = concat(inputs)
        return LayerResult(up=up, down=down)

    def direct_kernel(self, plan: MergePlan, out_dtype: torch.dtype, tol: float) -> ExactConcat | None:
        if plan.device.type != "cpu":
            return None
        return ExactConcat(plan, out_dtype) if plan.rank is None else SumRefactor(plan, out_dtype, tol)
