"""``duolora``: DuoLoRA's ZipRank masks with layer priors and a weight-space Constyle term, solved from the
two files alone (docs/algorithms.md §6, §8).  Input 1 is the content LoRA, input 2 the style LoRA.

Differences from the public DuoLoRA code (on purpose): priors grouped by resolution (so ``mid_block`` and
``up_blocks.0`` are covered); the rank term is ``‖m‖₁`` (the nuclear norm of ``diag m``) with the hinge;
no early stop on the similarity term; any rank, alpha honoured.  See docs/ziplora-duolora.md.
"""
from __future__ import annotations

import warnings
from typing import Any

from .. import masks as M
from ..errors import UsageError
from ..formats.dit_arch import FAMILIES as DIT_FAMILIES
from ..priors import LayerPriors, load_priors
from . import register
from .base import LayerContext, MergePlan, Param
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

    def _reset(self) -> None:
        super()._reset()
        self._priors: LayerPriors | None = None
        self._priors_arch: object = ()
        self._roles: dict[str, int] = {}

    def prepare(self, plan: MergePlan) -> None:
        measured = None
        if self.priors in PRIORS_SOURCES:  # needs the base model and reference images; no fallback to a table
            measured = resolve(PRIORS_SOURCES[self.priors])(self.config, plan.adapters, device=plan.device,
                                                            seed=plan.seed,
                                                            allow_pickle=bool(getattr(plan, "allow_pickle", False)))
        self.measured_priors, self._measurement = measured or (None, None)
        super().prepare(plan)  # resets the per-merge state, then solves (weights) or trains (model)

    def model_priors(self):
        return self.measured_priors if self.priors in PRIORS_SOURCES else self.priors

    def _load(self, arch: str | None) -> LayerPriors:
        spec = self.priors
        self._priors_arch = arch
        if spec == "measure":
            if self.measured_priors is None:
                raise UsageError("duolora --priors measure: the priors are measured in prepare(), which has not run")
            return self.measured_priors
        if spec == "none":
            return LayerPriors(source="none")
        if spec == "auto" and arch in DIT_FAMILIES:  # no UNet resolutions, so no DuoLoRA priors
            table = "--priors flux-splitflux or a priors file" if arch == "flux" else "--priors FILE"
            base = ("--base: its diffusers pipeline folder, with --content-images/--content-prompt/--style-images/"
                    "--style-prompt" if arch in ("flux", "sd3", "z-image") else
                    "--base: a model registered with register_base_model; only FLUX.1, SD3 and Z-Image pipeline folders load")
            raise UsageError(
                f"duolora: DuoLoRA's resolution priors do not exist for a DiT ({DIT_FAMILIES[arch].display} has no "
                f"UNet resolutions); give a block table ({table}) or --priors measure on a base model you supply "
                f"({base})")
        if spec == "auto" and arch is None:
            warnings.warn("duolora: the architecture is unknown, so every layer is neutral (no layer priors); "
                          "pass --arch or --priors", stacklevel=2)  # fmt: skip
            return LayerPriors(source="none (architecture unknown)")
        return load_priors(spec, arch)

    def axis_for(self, ctx: LayerContext) -> str:
        return "rank"

    def layer_setup(self, ctx: LayerContext, rc: int, rs: int):
        if self._priors is None or (self.priors == "auto" and self._priors_arch != ctx.arch):
            self._priors = self._load(ctx.arch)
        role = self._priors.role_of(ctx.name)
        score = self._priors.score_of(ctx.name) if role != "neutral" else 0.0
        self._roles[role] = self._roles.get(role, 0) + 1
        init = M.prior_init(rc, rs, role, ctx.generator("duolora-prior-init")) if self.prior_init else None
        weights = {"lambda_sim": self.lambda_sim, "lambda_prior": self.lambda_prior,
                   "lambda_hinge": self.lambda_hinge, "lambda_cycle": self.lambda_cycle,
                   "role": role, "prior_score": score}  # fmt: skip
        return weights, init, {"role": role, "prior_score": score}

    def report(self) -> dict[str, Any]:
        rep = super().report()
        rep["priors"] = {"spec": self.priors, "source": self._priors.source if self._priors else None,
                         "layers_by_role": dict(sorted(self._roles.items()))}  # fmt: skip
        if self._measurement is not None:
            rep["priors"]["measured"] = self._measurement.to_dict()
        return rep
