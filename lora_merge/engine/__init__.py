"""The merge engine: line up the modules of N adapters and hand each layer to a strategy.

The engine owns the strength semantics (``ΔW = Σ w_i · s_i · B_i A_i``, each scale applied once), the
plan (union of modules, shape checks, per-input and per-pattern weights: :mod:`.plan`), the layer loop
and re-factorization of dense or over-rank results (:mod:`.layers`), the recipe (:mod:`.recipe`) and
what is written (:mod:`.output`).  :func:`merge` / :func:`run_merge` (:mod:`.run`) put them together.
"""

from __future__ import annotations

from ..files import input_sha256, parse_dtype
from .layers import REFACTOR_TOL
from .output import mask_sidecar_path, sidecar_path
from .plan import Plan
from .recipe import RECIPE_KEYS, MergeOptions, Recipe, parse_layer_weight, read_recipe_file
from .run import MergeResult, merge, run_merge

__all__ = [
    "RECIPE_KEYS",
    "REFACTOR_TOL",
    "MergeOptions",
    "MergeResult",
    "Plan",
    "Recipe",
    "input_sha256",
    "mask_sidecar_path",
    "merge",
    "parse_dtype",
    "parse_layer_weight",
    "read_recipe_file",
    "run_merge",
    "sidecar_path",
]
