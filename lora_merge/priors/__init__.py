"""Layer priors: which UNet blocks carry content and which carry style (DuoLoRA, docs/algorithms.md §6).

``table`` holds the tables (:class:`LayerPriors`, built-in and registered tables, the priors file);
``measured`` the data of a measurement (groups, the role rule, :class:`MeasuredPriors` → table).  The
names below are re-exported so ``from lora_merge.priors import LayerPriors`` works.
"""

from __future__ import annotations

from . import flux  # noqa: F401 - registers the FLUX.1 block table (--priors flux-splitflux)
from .measured import MeasuredPriors, assign_role, group_modules, to_layer_priors
from .table import (
    PRIORS_FORMAT,
    ROLES,
    LayerPriors,
    PriorRule,
    builtin_priors,
    load_priors,
    priors_for_arch,
    priors_from_resolutions,
    register_priors,
)

__all__ = [
    "PRIORS_FORMAT",
    "ROLES",
    "LayerPriors",
    "MeasuredPriors",
    "PriorRule",
    "assign_role",
    "builtin_priors",
    "group_modules",
    "load_priors",
    "priors_for_arch",
    "priors_from_resolutions",
    "register_priors",
    "to_layer_priors",
]
