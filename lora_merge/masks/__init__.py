"""Merge masks for two LoRAs (content ``c``, style ``s``) solved per layer from the factors alone.

Mask families (docs/algorithms.md §2, §5, §6), all folded exactly into the factors:

* ``out``  — ZipLoRA (paper): ``ΔW_m = diag(u) ΔW_c + diag(v) ΔW_s``, ``u, v ∈ R^{d_out}``;
* ``in``   — ZipLoRA (public code): ``ΔW_m = ΔW_c diag(u) + ΔW_s diag(v)``, ``u, v ∈ R^{d_in}``;
* ``rank`` — DuoLoRA's ZipRank: ``ΔW_m = B_c diag(m_c) Â_c + B_s diag(m_s) Â_s``.

Here ``Â = weight · scale · A``: the user's strength and the LoRA's ``alpha/r`` are folded into the down
factor once, so the targets are the LoRAs at the strengths the user asked for.

Objective (docs/algorithms.md §8), with inputs of second moment ``Σ_c`` / ``Σ_s`` (:mod:`lora_merge.input_models`)::

    F = ‖(ΔW_m − ΔW_c) X_c‖²/‖ΔW_c X_c‖² + ‖(ΔW_m − ΔW_s) X_s‖²/‖ΔW_s X_s‖²          reconstruction
        + λ_cyc · (‖(ΔW_m − ΔW_c − ΔW_s) X_c‖²/‖ΔW_c X_c‖² + (same on X_s))          weight-space Constyle
        + λ_sim · mean_i |m_c(i) m_s(i)|                                             similarity
        + λ_prior · score · L_prior(m_c, m_s)                                        DuoLoRA rank prior

Every quadratic term is ``(z − t)ᵀ H (z − t)`` in the stacked mask vector ``z`` with ``H = (PᵀP) ⊙ (Q Σ Qᵀ)``
(``P = [B_c B_s]``, ``Q = [Â_c; Â_s]``): an ``R × R`` matrix for rank masks, independent ``2 × 2`` blocks
per output row for ``out`` masks (and per input column for ``in`` masks when ``Σ = I``), and a
matrix-free operator for ``in`` masks otherwise.  The quadratic part is minimized in closed form
(the minimizer nearest to the initialization where it is not unique), then the full objective is
refined with Adam; the best iterate is kept.  The solver works in float64 on small arrays.

Two modules: :mod:`~lora_merge.masks.problem` (folding, terms, :class:`MaskProblem`, :func:`build_problem`,
the closed form, :func:`prior_init`) and :mod:`~lora_merge.masks.optimizer` (the Adam loops, :class:`Solution`,
:func:`start` / :func:`finish` / :func:`solve`).  Every public name is re-exported here.
"""
from __future__ import annotations

from .objective import (
    Concept,
    LayerMasks,
    MaskObjective,
    MaskSolution,
    MaskSolver,
    References,
    SolveOptions,
    check_references,
)
from .optimizer import Solution, finish, refine, refine_many, solve, start
from .problem import (
    AXES,
    MaskAxis,
    MaskProblem,
    Terms,
    _prior_grad,  # noqa: F401  (tests check the sub-gradient through the package)
    build_problem,
    dense_masked_sum,
    fold,
    fold_pair,
    prior_init,
    prior_rank_term,
    similarity,
)

__all__ = [
    "AXES",
    "Concept",
    "LayerMasks",
    "MaskAxis",
    "MaskObjective",
    "MaskProblem",
    "MaskSolution",
    "MaskSolver",
    "References",
    "Solution",
    "SolveOptions",
    "Terms",
    "build_problem",
    "check_references",
    "dense_masked_sum",
    "finish",
    "fold",
    "fold_pair",
    "prior_init",
    "prior_rank_term",
    "refine",
    "refine_many",
    "similarity",
    "solve",
    "start",
]
