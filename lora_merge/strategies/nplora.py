"""``np-lora``: NP-LoRA, null-space projection of the content LoRA off the style LoRA's principal input
directions (Chen et al., arXiv 2511.11051).  Input 1 is the content LoRA, input 2 the style LoRA (the
convention of ``ziplora`` and ``duolora``, :func:`~lora_merge.strategies.pair_masks.content_style_factors`).

Per layer, with ``ΔW_c``, ``ΔW_s`` the weighted updates (``w·s·B·A``, strength applied once)::

    ΔW_m = ΔW_s + ΔW_c (I − c·V_k V_kᵀ),   c = μ/(1+μ)

where ``V_k`` (``d_in × k``) are the top-``k`` right singular vectors of ``ΔW_s``.  ``μ = 0`` is the
linear merge, ``--hard`` (the paper's ``μ = ∞``, ``c = 1``) the hard projection.  ``--symmetric`` also projects the style off
the content's top-``k`` right singular vectors ``V_c`` (both bases from the unprojected updates)::

    ΔW_m = ΔW_s (I − c·V_c V_cᵀ) + ΔW_c (I − c·V_k V_kᵀ)

Factor form: ``ΔW_c (I − c V Vᵀ) = B_c · (A_c − c (A_c V) Vᵀ)`` (``A_c`` weighted), so the output is
``[B_c  B_s] · [A_c − c(A_c V_k)V_kᵀ;  A_s]``, exactly a LoRA of rank ``r_c + r_s`` (of the inputs that
contribute to the layer).  ``V_k`` comes from the factors (:func:`lora_merge.linalg.core_svd`: Gram or
QR of ``B_s``, ``A_s`` and an SVD of the small core), never from a dense SVD of ``ΔW_s``.
See docs/strategies.md (``np-lora``) and docs/algorithms.md §9.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .. import linalg
from ..errors import UsageError
from . import register
from .base import LayerContext, LayerInput, LayerResult, MergePlan, MergeStrategy, Param
from .pair_masks import content_style_factors


def soft_factor(mu: float, hard: bool = False) -> float:
    """The projection strength ``c = μ/(1+μ)`` in ``[0, 1)``; 1 for the hard projection (``μ = ∞``)."""
    return 1.0 if hard or math.isinf(mu) else mu / (1.0 + mu)


def right_basis(up: torch.Tensor, down: torch.Tensor, k: int) -> torch.Tensor:
    """An orthonormal basis (``d_in × k'``) of the top-``k`` right singular vectors of ``up @ down``, from the
    factors alone (:func:`lora_merge.linalg.core_svd`, then a thin QR of the ``d_in × k'`` block); ``k = 0``
    (or more than there are): every direction above the numerical-rank tolerance, so ``k' ≤ min(k, rank)``.
    An empty update gives ``d_in × 0``."""
    d_in = down.shape[1]
    if down.shape[0] == 0 or up.shape[1] == 0:
        return down.new_zeros(d_in, 0)
    _, s, vh = linalg.core_svd(up, down)
    n = linalg.numerical_rank(s, (up.shape[0], d_in))
    kk = n if k == 0 else min(int(k), n)
    q, _ = torch.linalg.qr(vh[:kk].T)  # same span; orthonormal to fp32 rounding (the projector is V Vᵀ)
    return q


def project_off(down: torch.Tensor, basis: torch.Tensor, c: float) -> torch.Tensor:
    """``A (I − c V Vᵀ) = A − c (A V) Vᵀ`` without the ``d_in × d_in`` projector (``V``: orthonormal columns)."""
    if c == 0.0 or basis.shape[1] == 0 or down.shape[0] == 0:
        return down
    return down - c * ((down @ basis) @ basis.T)


def overlap(up: torch.Tensor, down: torch.Tensor, basis: torch.Tensor) -> float:
    """``‖ΔW V‖_F / ‖ΔW‖_F`` for ``ΔW = up @ down``: the share of the update in the subspace ``V`` (0 when
    either is empty)."""
    if basis.shape[1] == 0 or down.shape[0] == 0:
        return 0.0
    total = linalg.frobenius_norm(up, down)
    return linalg.frobenius_norm(up, down @ basis) / total if total > 0 else 0.0


def np_lora_factors(bc: torch.Tensor, ac: torch.Tensor, bs: torch.Tensor, as_: torch.Tensor, c: float, k: int,
                    symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(up, down, info)`` of the NP-LoRA merge of content ``B_c A_c`` and style ``B_s A_s`` (the ``A``'s
    weighted) with projection strength ``c`` (:func:`soft_factor`), rank ``r_c + r_s``; see the module
    docstring."""
    vs = right_basis(bs, as_, k)
    info: dict[str, Any] = {"projection": c, "style_directions": int(vs.shape[1]),
                            "content_overlap": overlap(bc, ac, vs)}  # fmt: skip
    down_c = project_off(ac, vs, c)
    down_s = as_
    if symmetric:
        vc = right_basis(bc, ac, k)  # from the unprojected content update
        info["content_directions"] = int(vc.shape[1])
        info["style_overlap"] = overlap(bs, as_, vc)
        down_s = project_off(as_, vc, c)
    return torch.cat([bc, bs], dim=1), torch.cat([down_c, down_s], dim=0), info


@register
class NpLoRA(MergeStrategy):
    name = "np-lora"
    description = ("NP-LoRA: content (input 1) projected off the style's (input 2) top-k right singular "
                   "directions, softly by μ/(1+μ), plus the style; factors of rank r_c + r_s, no re-factorization.")  # fmt: skip
    reference = "Chen et al., NP-LoRA, arXiv 2511.11051 (Eq. 12, soft projection); docs/algorithms.md §9"
    exact = False
    min_inputs = 2
    max_inputs = 2
    params = (
        Param("mu", float, 0.5, "soft-projection strength μ ≥ 0 (finite): the content keeps 1/(1+μ) of its part "
              "in the style subspace (0: linear merge; the paper uses 0.5)", range=(0.0, None)),
        Param("hard", bool, False, "hard projection, the paper's μ = ∞: the content keeps nothing in the style "
              "subspace (--mu is not used)"),
        Param("k", int, 0, "style directions protected: the top-k right singular vectors of the style update "
              "(0: all of them, its numerical rank ≤ r_s, as the paper)", range=(0, None)),
        Param("symmetric", bool, False, "also project the style off the content's top-k right singular "
              "directions by the same μ (not in the paper, which finds this direction erases the style)"),
    )  # fmt: skip

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        if not math.isfinite(self.config["mu"]):
            raise UsageError(f"strategy {self.name!r} parameter 'mu': expected a finite number ≥ 0, got {self.config['mu']!r}"
                             + ("; for the hard projection (μ = ∞) use --hard (hard: true)" if self.config["mu"] > 0 else ""))
        self._layers = 0
        self._overlap = 0.0

    def prepare(self, plan: MergePlan) -> None:
        self._layers, self._overlap = 0, 0.0  # a configured instance may merge more than once

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        c = soft_factor(self.config["mu"], self.config["hard"])
        up, down, info = np_lora_factors(*content_style_factors(inputs), c, self.config["k"], self.config["symmetric"])
        self._layers += 1
        self._overlap += info["content_overlap"]
        return LayerResult(up=up, down=down, info=info)

    def report(self) -> dict[str, Any]:
        return {"strategy": self.name, "mu": None if self.config["hard"] else self.config["mu"], "hard": self.config["hard"],
                "projection": soft_factor(self.config["mu"], self.config["hard"]), "k": self.config["k"], "symmetric": self.config["symmetric"],
                "layers": self._layers,
                "content_overlap_mean": self._overlap / self._layers if self._layers else None}  # fmt: skip
