"""``duolora``: DuoLoRA's ZipRank masks with layer priors and a weight-space Constyle term, solved from the
two files alone (docs/algorithms.md §6, §8).  Input 1 is the content LoRA, input 2 the style LoRA.

Differences from the public DuoLoRA code (on purpose): priors grouped by resolution (so ``mid_block`` and
``up_blocks.0`` are covered); the rank term is ``‖m‖₁`` (the nuclear norm of ``diag m``) with the hinge;
no early stop on the similarity term; any rank, alpha honoured.  See docs/ziplora-duolora.md.
"""
from __future__ import annotations

from typing import Any

from ..masks import MaskObjective
from ..priors import LayerPriors
from . import register
from .base import MergePlan, Param
from .pair_masks import (
    INPUT_PARAMS,
    MODEL_MODE_PARAMS,
    REFINE_PARAMS,
    STRENGTH_PARAM,
    PairMaskStrategy,
    resolve,
)

#: priors measured on a base model rather than read from a table, as ``"module:function"`` seams; the
#: function takes ``(config, adapters, *, device, seed)`` and returns ``(LayerPriors, measurement)``
PRIORS_SOURCES: dict[str, str] = {"measure": "lora_merge.model_mode.measure_priors:measured_priors_for"}


#: named configurations (``--preset``): what each changes from the declared defaults
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # the paper (Roy et al. §4, algorithms.md §6): priors initialise the masks, λ_prior 0.1, λ_cycle 0.01,
    # Adam 100 steps at lr 0.01, masks used as trained
    "paper": {"prior_init": True, "lambda_prior": 0.1, "lambda_cycle": 0.01, "steps": 100, "lr": 0.01,
              "strength": "free"},
}


@register
class DuoLoRA(PairMaskStrategy):
    name = "duolora"
    description = ("DuoLoRA from the two files alone: rank-dimension masks (ZipRank) with layer priors and a "
                   "weight-space cycle-consistency term; closed form + Adam.")  # fmt: skip
    reference = "Roy et al., DuoLoRA, arXiv 2504.13206 (ICCV 2025); docs/algorithms.md §6, §8"
    exact = False
    params = (
        Param("lambda_sim", float, 0.01, "weight of the similarity term mean|m_c·m_s|", range=(0.0, None)),
        Param("lambda_prior", float, 0.01, "weight of the layer-prior rank term (0: off; the paper's 0.1 is "
              "relative to its noise-space MSE, see docs)", range=(0.0, None)),
        Param("lambda_hinge", float, 1.0, "weight of the hinge inside the prior term", range=(0.0, None)),
        Param("lambda_cycle", float, 0.01, "weight of the weight-space Constyle (additivity) term (0: off)",
              range=(0.0, None)),
        Param("priors", str, "auto", "layer priors: auto (from the architecture; UNets only), sdxl, sd1, b-lora, "
              "flux-splitflux (FLUX.1 blocks), none, measure (measured on --base with the reference images, see "
              "docs/priors.md), or a priors file"),
        Param("prior_init", bool, False, "initialize the masks from the priors (seeded draw, the paper); off: "
              "all ones (default: the prior init starts the masks at a mean of 0.375/0.22, docs/ziplora-duolora.md)"),
        Param("closed_form", bool, True, "solve the quadratic part in closed form (nearest to the "
              "initialization) before refining; off: Adam from the initialization, as the paper"),
        STRENGTH_PARAM,
        Param("preset", str, "default", "default: the defaults above; paper: the DuoLoRA paper's configuration "
              "(prior init, λ_prior 0.1, masks used as trained: --strength free); options given explicitly "
              "win over the preset", choices=tuple(PRESETS)),
        *REFINE_PARAMS,
        *INPUT_PARAMS,
        *MODEL_MODE_PARAMS,
    )  # fmt: skip

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        for key, value in PRESETS[self.config["preset"]].items():
            if kwargs.get(key) is None:  # an explicit option wins over the preset
                self.config[key] = value

    measured_priors: LayerPriors | None = None  # --priors measure: set in prepare()
    _measurement: Any = None

    def prepare(self, plan: MergePlan) -> None:
        measured = None
        if self.config["priors"] in PRIORS_SOURCES:  # needs the base model and the reference images; no fallback
            measured = resolve(PRIORS_SOURCES[self.config["priors"]])(self.config, plan.adapters, device=plan.device,
                                                                      seed=plan.seed, allow_pickle=plan.allow_pickle)
        self.measured_priors, self._measurement = measured or (None, None)
        super().prepare(plan)  # resets the per-merge state, then solves (weights) or trains (model)

    def mask_objective(self, plan: MergePlan | None = None) -> MaskObjective:
        """ZipRank (rank masks) with the layer-prior rank term, its hinge and the Constyle terms; the reverse
        cycle weighs ``--lambda-rev`` (default ``--lambda-cycle``)."""
        cfg = self.config
        measured = cfg["priors"] in PRIORS_SOURCES and self.measured_priors is not None
        priors = self.measured_priors if measured else cfg["priors"]  # "measure" unmeasured: the solvers refuse
        lam_cycle = float(cfg["lambda_cycle"])
        lam_rev = cfg.get("lambda_rev")
        return MaskObjective(
            axis="rank", lambda_sim=float(cfg["lambda_sim"]), lambda_prior=float(cfg["lambda_prior"]),
            lambda_hinge=float(cfg["lambda_hinge"]), lambda_cycle=lam_cycle,
            lambda_rev=lam_cycle if lam_rev is None else float(lam_rev), priors=priors,
            prior_init=bool(cfg["prior_init"]), init_salt=f"{self.name}-prior-init", **self.refine_settings(),
        )  # fmt: skip

    def report(self) -> dict[str, Any]:
        rep = super().report()
        rep["priors"] = {"spec": self.config["priors"], "source": self._priors_source(),
                         "layers_by_role": dict(sorted(self._roles.items()))}  # fmt: skip
        if self._measurement is not None:
            rep["priors"]["measured"] = self._measurement.to_dict()
        return rep
