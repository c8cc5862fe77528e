"""The two-LoRA mask strategies' shared machinery (``ziplora``, ``duolora``, plug-ins): input 1 is the
content LoRA, input 2 the style LoRA; each gets a mask (per output or input dimension, or per rank) and the
merge is the folded pair, a standard LoRA of rank ``r_c + r_s``.

A strategy subclasses :class:`PairMaskStrategy`, declares its :class:`~lora_merge.strategies.base.Param`
list and implements one method, :meth:`PairMaskStrategy.mask_objective`: its parameters as a frozen
:class:`~lora_merge.masks.MaskObjective` (axis, term weights, layer priors, initial masks).  ``--mode``
picks the solver (:mod:`lora_merge.strategies.mask_solvers`): ``weights`` from the two files alone, or
``model`` through the diffusion model on the reference images (:meth:`PairMaskStrategy.references`);
layers the model does not reach (e.g. a text encoder's) are solved in weight space and listed in the
report.  The strategy folds the masks.

The objective, closed form and refinement are documented in docs/ziplora-duolora.md, model mode in
docs/model-mode.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .. import masks as M
from ..arch import sub_block_of
from ..errors import UsageError
from ..input_models import INPUT_MODELS, InputModel, resolve_input_model
from ..masks import Concept, LayerMasks, MaskObjective, MaskSolution, References, SolveOptions
from .base import LayerContext, LayerInput, LayerResult, MergePlan, MergeStrategy, Param
from .mask_solvers import SOLVERS, WeightSpaceSolver, content_style_factors, get_solver, inputs_key, resolve

__all__ = [
    "INPUT_PARAMS",
    "MODEL_MODE_PARAMS",
    "REFINE_PARAMS",
    "REQUIRED_IN_MODEL_MODE",
    "SOLVERS",
    "PairMaskStrategy",
    "check_weights_mode",
    "content_style_factors",
    "fold_masks",
    "preserve_strength",
    "resolve",
]

#: per-layer mask lists longer than this go to the sidecar only (the JSON report gets summaries)
MAX_MASK_IN_INFO = 512

MODES = tuple(SOLVERS)


#: the Adam refinement shared by ziplora and duolora (paper: 100 steps at lr 0.01)
REFINE_PARAMS = (
    Param("steps", int, 100, "Adam refinement steps on the full objective (0: closed form only)",
          range=(0, None)),
    Param("lr", float, 0.01, "Adam learning rate", range=(0.0, None)),
)
INPUT_PARAMS = (
    Param("input_model", str, "subspace", "model of each LoRA's inputs: subspace (each LoRA's own input "
          "subspace), identity, or stats (second moments from --stats FILE)", choices=INPUT_MODELS),
    Param("stats", str, None, "input statistics file (safetensors, see docs/ziplora-duolora.md) for "
          "--input-model stats"),
)  # fmt: skip

#: how solved masks are used: "preserve" keeps each LoRA's mean strength per layer (docs/quality.md,
#: "Why the mask strategies lost the style"); "free" as solved (the papers)
STRENGTHS = ("preserve", "free")
STRENGTH_PARAM = Param(
    "strength", str, "preserve",
    "preserve: rescale each LoRA's masks in a layer to mean 1, so the masks move strength between a LoRA's "
    "directions but never lower its overall strength (a concept vanishes below a strength threshold; "
    "docs/ziplora-duolora.md); free: the masks as solved or trained (the papers)",
    choices=STRENGTHS,
)  # fmt: skip

MODE_PARAM = Param(
    "mode", str, "weights",
    "weights: solve the masks from the two files alone; model: train them through the diffusion model on "
    "reference images (needs --base, --content-images/--content-prompt, --style-images/--style-prompt)",
    choices=MODES,
)  # fmt: skip

#: the parameters model mode adds to ziplora and duolora (the shared ones — steps, lr, the λ's, axis,
#: priors — are the strategies' own, and model mode reads them too)
MODEL_MODE_PARAMS: tuple[Param, ...] = (
    MODE_PARAM,
    Param("base", str, None, "model mode and --priors measure: base model, a local diffusers pipeline folder "
          "(SD 1.x, SDXL; FLUX.1, SD3/3.5 and Z-Image for --priors measure only) or a registered one such as 'toyworld'"),
    Param("content_images", str, None, "model mode: folder of content reference images (or a registered "
          "source such as toyworld:content)"),
    Param("content_prompt", str, None, "model mode: prompt of the content images"),
    Param("style_images", str, None, "model mode: folder of style reference images (or a registered "
          "source such as toyworld:style)"),
    Param("style_prompt", str, None, "model mode: prompt of the style images"),
    Param("cycle_prompt", str, None, "model mode: prompt of content in style for the Constyle cycles, e.g. "
          "'a sks dog in zkz style' (default: the content and style prompts joined)"),
    Param("lambda_rev", float, None, "model mode: weight of the reverse Constyle cycle (style → add content "
          "→ remove content); default: --lambda-cycle", range=(0.0, None)),
    Param("mixed_precision", str, "no", "model mode: accelerate mixed precision", choices=("no", "fp16", "bf16")),
    Param("batch_size", int, 1, "model mode: content and style images per step", range=(1, None)),
)  # fmt: skip

#: what ZipLoRA takes of them: it has no Constyle cycles, so no cycle prompt or reverse-cycle weight
ZIPLORA_MODEL_PARAMS: tuple[Param, ...] = tuple(
    p for p in MODEL_MODE_PARAMS if p.name not in ("cycle_prompt", "lambda_rev")
)

#: parameters the model solver needs (it names the missing ones)
REQUIRED_IN_MODEL_MODE = ("base", "content_images", "content_prompt", "style_images", "style_prompt")


def check_weights_mode(config: dict[str, Any]) -> None:
    """Model-mode options given without ``--mode model`` are a usage error (they would be ignored);
    ``--priors measure`` uses the base model and reference images in weight space too."""
    defaults = {p.name: p.default for p in MODEL_MODE_PARAMS if p.name != "mode"}
    given = [k for k, d in defaults.items() if config.get(k) is not None and config.get(k) != d]
    if config.get("priors") == "measure":
        given = [k for k in given if k not in REQUIRED_IN_MODEL_MODE]
    if given:
        raise UsageError(", ".join("--" + k.replace("_", "-") for k in given) + " only apply with --mode model")


class PairMaskStrategy(MergeStrategy):
    """Base for two-input mask strategies.  Subclasses declare ``params`` and implement
    :meth:`mask_objective`."""

    min_inputs = 2
    max_inputs = 2
    sidecar_suffixes = ("masks",)
    #: what a recipe recorded before ``--strength`` existed meant (replayed as it was merged)
    recorded_defaults: ClassVar[dict[str, Any]] = {"strength": "free"}

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._model: InputModel | None = None
        self._fallback = WeightSpaceSolver()
        self._reset()

    def _reset(self) -> None:
        self._trainable = 0
        self._layers = 0
        self._loss: dict[str, dict[str, float]] = {}
        self._blocks: dict[str, dict[str, float]] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._roles: dict[str, int] = {}
        self._objective: MaskObjective | None = None
        self._solution: MaskSolution | None = None

    # ---- the one hook of a mask strategy
    def mask_objective(self, plan: MergePlan | None = None) -> MaskObjective:
        """This strategy's parameters as the objective the solvers minimize (``plan``: the merge, for
        strategies whose objective depends on it)."""
        raise NotImplementedError

    def references(self) -> References | None:
        """The reference images and prompts (``--content-images``, ``--content-prompt``, …), None when the
        strategy has none."""
        cfg = self.config
        if not (cfg.get("content_images") or cfg.get("content_prompt") or cfg.get("style_images")
                or cfg.get("style_prompt")):  # fmt: skip
            return None
        return References(Concept(cfg.get("content_images"), cfg.get("content_prompt")),
                          Concept(cfg.get("style_images"), cfg.get("style_prompt")), cfg.get("cycle_prompt"))

    @property
    def solver_mode(self) -> str:
        return str(self.config.get("mode") or "weights")

    # ---- engine hooks
    def prepare(self, plan: MergePlan) -> None:
        """Build the objective and hand it to the ``--mode`` solver: weight space solves every layer up front
        (vectorized Adam); model mode trains through the model, and the layers it does not reach are solved
        in weight space on demand in :meth:`merge_layer`."""
        self._reset()
        self._model = resolve_input_model(self.config["input_model"], self.config.get("stats"))
        if self.solver_mode == "weights":
            check_weights_mode(self.config)  # model-mode options without --mode model would be ignored
        self._objective = self.mask_objective(plan)
        options = SolveOptions.from_config(self.config, device=plan.device, seed=plan.seed,
                                           allow_pickle=plan.allow_pickle)  # fmt: skip
        self._solution = get_solver(self.solver_mode).solve(self._objective, plan, self.references(), options)

    def input_model_obj(self) -> InputModel:
        if self._model is None:
            self._model = resolve_input_model(self.config["input_model"], self.config.get("stats"))
        return self._model

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        if self._objective is None:  # merge_layer without prepare (API use): the objective of no plan
            self._objective = self.mask_objective(None)
        sol = self._solution
        solved = sol.layers.pop(ctx.name, None) if sol is not None else None
        if solved is not None and solved.solution is None:
            return self._fold_learned(inputs, ctx, solved)
        if sol is not None and sol.solver != "weights" and ctx.name not in sol.skipped:
            sol.skipped.append(ctx.name)
        if solved is None or solved.key != inputs_key(inputs):
            solved = self._fallback.solve_layer(self._objective, inputs, ctx)
        return self._fold_solved(inputs, ctx, solved)

    def _fold_solved(self, inputs: Sequence[LayerInput], ctx: LayerContext, solved: LayerMasks) -> LayerResult:
        bc, ac, bs, as_ = content_style_factors(inputs)
        axis = self._objective.axis_for(ctx.name)
        sol = solved.solution
        n_values = sol.mask_c.numel() + sol.mask_s.numel()
        if self.config["strength"] == "preserve":
            sol.mask_c, sol.mask_s = preserve_strength(sol.mask_c), preserve_strength(sol.mask_s)
        up, down = M.fold_pair(axis, bc, ac, bs, as_, sol.mask_c.to(ac.device), sol.mask_s.to(ac.device))
        self._record(ctx, n_values, sol, solved.info)
        extra = {k: v for k, v in solved.info.items() if k != "trainable_values"}
        info: dict[str, Any] = {"mask_axis": axis, "trainable_values": n_values, **extra}
        if sol.mask_c.numel() + sol.mask_s.numel() <= MAX_MASK_IN_INFO:
            info["mask_content"] = [round(float(x), 6) for x in sol.mask_c]
            info["mask_style"] = [round(float(x), 6) for x in sol.mask_s]
        else:
            info["mask_content_mean"] = float(sol.mask_c.mean()) if sol.mask_c.numel() else None
            info["mask_style_mean"] = float(sol.mask_s.mean()) if sol.mask_s.numel() else None
        info["loss"] = {"init": sol.init.as_dict(), "final": sol.final.as_dict()}
        if sol.closed_form is not None:
            info["loss"]["closed_form"] = sol.closed_form.as_dict()
        info["best_step"] = sol.best_step
        return LayerResult(up=up, down=down, info=info)

    def _fold_learned(self, inputs: Sequence[LayerInput], ctx: LayerContext, solved: LayerMasks) -> LayerResult:
        """The masks a model solver learned for this layer, folded into the pair (strength applied once)."""
        axis = self._objective.axis_for(ctx.name)
        mc, ms = solved.content, solved.style
        if self.config["strength"] == "preserve":
            mc = None if mc is None else preserve_strength(mc)
            ms = None if ms is None else preserve_strength(ms)
        self._masks[f"{ctx.name}.mask_content"] = (mc if mc is not None else torch.ones(0)).contiguous()
        self._masks[f"{ctx.name}.mask_style"] = (ms if ms is not None else torch.ones(0)).contiguous()
        up, down, mc, ms = fold_masks(inputs, mc, ms, axis)
        info = {"mask_axis": axis, "mode": self.solver_mode, "trainable_values": int(mc.numel() + ms.numel()),
                "mask_content_mean": float(mc.mean()) if mc.numel() else None,
                "mask_style_mean": float(ms.mean()) if ms.numel() else None}  # fmt: skip
        return LayerResult(up=up, down=down, info=info)

    def _record(self, ctx: LayerContext, n_values: int, sol: M.Solution, info: dict[str, Any]) -> None:
        self._trainable += n_values
        self._layers += 1
        if "role" in info:
            self._roles[info["role"]] = self._roles.get(info["role"], 0) + 1
        for stage, t in (("init", sol.init), ("closed_form", sol.closed_form), ("final", sol.final)):
            if t is None:
                continue
            acc = self._loss.setdefault(stage, {})
            for k, v in t.as_dict().items():
                acc[k] = acc.get(k, 0.0) + v
        blk = ctx.block or "other"
        b = self._blocks.setdefault(blk, {"layers": 0, "mask_content": 0.0, "mask_style": 0.0})
        b["layers"] += 1
        b["mask_content"] += float(sol.mask_c.mean()) if sol.mask_c.numel() else 0.0
        b["mask_style"] += float(sol.mask_s.mean()) if sol.mask_s.numel() else 0.0
        self._masks[f"{ctx.name}.mask_content"] = sol.mask_c.detach().cpu().contiguous()
        self._masks[f"{ctx.name}.mask_style"] = sol.mask_s.detach().cpu().contiguous()

    def report(self) -> dict[str, Any]:
        n = max(self._layers, 1)
        blocks = {}
        for blk, b in sorted(self._blocks.items()):
            k = b["layers"]
            blocks[blk] = {"layers": k, "mask_content": b["mask_content"] / k, "mask_style": b["mask_style"] / k}
        rep = {
            "strategy": self.name,
            "trainable_values": self._trainable,
            "layers": self._layers,
            **self.input_model_obj().describe(),
            "loss_mean": {stage: {k: v / n for k, v in d.items()} for stage, d in self._loss.items()},
            "blocks": blocks,
            "mask_sidecar_keys": "<module>.mask_content / <module>.mask_style",
        }
        if self._solution is not None and self._solution.details is not None:
            self._add_solver_report(rep)
        return rep

    def _add_solver_report(self, rep: dict[str, Any]) -> None:
        sol = self._solution
        trained = sol.details
        weight_space = rep.get("trainable_values", 0) or 0
        model_rep = trained.report()
        model_rep["weight_space_layers"] = model_rep.pop("not_trained")
        rep.update({"mode": sol.solver, "model_mode": model_rep})
        rep["trainable_values"] = trained.num_trainable + int(weight_space)
        rep["layers"] = len(trained.masks) + len(trained.skipped)
        rep["input_model"] = "model (masks trained through the UNet)"
        blocks = rep.setdefault("blocks", {})
        for blk, means in model_rep["block_mean_masks"].items():
            n = sum(1 for name in trained.masks if (sub_block_of(name) or name) == blk)
            blocks["unet." + blk] = {"layers": n, "mask_content": means["content"], "mask_style": means["style"]}

    def _priors_source(self) -> str | None:
        """Where the weight-space layer priors came from (None: no layer was solved with priors)."""
        sol = self._solution
        return (sol.priors_source if sol is not None else None) or self._fallback.priors_source

    def sidecars(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every layer's masks, for the ``<output>.masks.safetensors`` sidecar (see docs)."""
        return {"masks": dict(self._masks)}

    # ---- for mask_objective(): the settings every objective takes from REFINE_PARAMS, closed_form and INPUT_PARAMS
    def refine_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {"steps": int(cfg["steps"]), "lr": float(cfg["lr"]), "closed_form": bool(cfg["closed_form"]),
                "input_model": self.input_model_obj()}  # fmt: skip


def preserve_strength(mask: torch.Tensor) -> torch.Tensor:
    """``mask / mean(mask)``: the same redistribution at the LoRA's own mean strength (a mask with mean
    ≤ 1e-6 — the LoRA switched off in this layer — is left as it is)."""
    if mask.numel() == 0:
        return mask
    mean = float(mask.float().mean())
    return mask if mean <= 1e-6 else mask / mean


def fold_masks(inputs: Sequence[LayerInput], mc: torch.Tensor | None, ms: torch.Tensor | None, axis: str):
    """Fold learned masks into the two :class:`LayerInput` with :func:`lora_merge.masks.fold_pair` (strength
    applied once): ``(up, down, mask_content, mask_style)``, a standard rank ``r_c + r_s`` LoRA."""
    c, s = inputs
    ac, as_ = c.down * c.coeff, s.down * s.coeff
    dev = ac.device
    mc = torch.ones(0) if mc is None else mc
    ms = torch.ones(0) if ms is None else ms
    if not c.present:
        ac, mc = c.down.new_zeros(0, c.down.shape[1]), torch.ones(0) if axis == "rank" else mc
    if not s.present:
        as_, ms = s.down.new_zeros(0, s.down.shape[1]), torch.ones(0) if axis == "rank" else ms
    up, down = M.fold_pair(axis, c.up[:, : ac.shape[0]], ac, s.up[:, : as_.shape[0]], as_, mc.to(dev), ms.to(dev))
    return up, down, mc, ms
