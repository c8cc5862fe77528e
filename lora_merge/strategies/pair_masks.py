"""The two-LoRA mask strategies' shared machinery (``ziplora``, ``duolora``): input 1 is the content LoRA,
input 2 the style LoRA; each gets a mask (per output or input dimension, or per rank) and the merge is
the folded pair, a standard LoRA of rank ``r_c + r_s``.

Two solvers find the masks, picked with ``--mode``:

- ``weights`` (default): from the two files alone — the per-layer weight-space objective of
  :mod:`lora_merge.masks`, solved in closed form and refined with Adam, vectorized over all layers in
  :meth:`PairMaskStrategy.prepare`;
- ``model``: trained through the diffusion model on reference images, as in the papers.  It is a seam
  resolved by name (:data:`SOLVERS`), so importing the strategies never imports diffusers; layers the
  model does not reach (e.g. a text encoder's) are solved in weight space and listed in the report.

The objective, closed form and refinement are documented in docs/ziplora-duolora.md, model mode in
docs/model-mode.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .. import masks as M
from ..arch import sub_block_of
from ..errors import UsageError
from ..input_models import INPUT_MODELS, InputModel, resolve_input_model
from .base import LayerContext, LayerInput, LayerResult, MergePlan, MergeStrategy, Param

__all__ = [
    "INPUT_PARAMS",
    "MODEL_MODE_PARAMS",
    "REFINE_PARAMS",
    "REQUIRED_IN_MODEL_MODE",
    "SOLVERS",
    "PairMaskStrategy",
    "check_model_inputs",
    "check_weights_mode",
    "content_style_factors",
    "resolve",
]

#: per-layer mask lists longer than this go to the sidecar only (the JSON report gets summaries)
MAX_MASK_IN_INFO = 512

#: the mask solvers other than the built-in weight-space one, as ``"module:function"``; the function
#: takes ``(strategy, plan)`` and returns the trained masks (``lora_merge.model_mode.mask_training.TrainResult``)
SOLVERS: dict[str, str] = {"model": "lora_merge.model_mode.solver:train_pair_masks"}

MODES = ("weights", *SOLVERS)


def resolve(ref: str) -> Any:
    """``"package.module:attr"`` → the object (the seams of this package are such strings)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


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

#: parameters that must be set in model mode
REQUIRED_IN_MODEL_MODE = ("base", "content_images", "content_prompt", "style_images", "style_prompt")


def check_model_inputs(config: dict[str, Any]) -> None:
    """Model mode with a missing input is a usage error (never a silent fallback to weight space)."""
    missing = [k for k in REQUIRED_IN_MODEL_MODE if not config.get(k)]
    if missing:
        raise UsageError("--mode model needs " + ", ".join("--" + k.replace("_", "-") for k in missing))


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
    """Base for two-input mask strategies.  Subclasses define ``axis_for`` and ``layer_setup``."""

    min_inputs = 2
    max_inputs = 2
    sidecar_suffixes = ("masks",)
    #: what a recipe recorded before ``--strength`` existed meant (replayed as it was merged)
    recorded_defaults: ClassVar[dict[str, Any]] = {"strength": "free"}

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._model: InputModel | None = None
        self._reset()

    def _reset(self) -> None:
        self._trainable = 0
        self._layers = 0
        self._loss: dict[str, dict[str, float]] = {}
        self._blocks: dict[str, dict[str, float]] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._pre: dict[str, tuple] = {}
        self._trained: Any = None  # the model solver's result (TrainResult) in model mode

    # ---- hooks for subclasses
    def axis_for(self, ctx: LayerContext) -> str:
        raise NotImplementedError

    def layer_setup(self, ctx: LayerContext, rc: int, rs: int) -> tuple[dict, tuple | None, dict]:
        """``(objective weights for build_problem, init masks or None for ones, extra info)``."""
        raise NotImplementedError

    def model_priors(self) -> Any:
        """The layer priors model-mode training uses (a spec or a ``LayerPriors``; None: no priors)."""
        return None

    # ---- engine hooks
    def prepare(self, plan: MergePlan) -> None:
        """Weights mode: solve every layer up front, so the Adam refinement runs vectorized over all
        layers (:func:`lora_merge.masks.refine_many`).  Model mode: train the masks through the model;
        the layers it does not reach are solved on demand in :meth:`merge_layer`."""
        self._reset()
        self._model = resolve_input_model(self.input_model, self.stats)
        if self.config.get("mode", "weights") != "weights":
            check_model_inputs(self.config)
            self._trained = resolve(SOLVERS[self.mode])(self, plan)
            return
        check_weights_mode(self.config)
        setups = []
        for layer in plan.layers():
            layer_in = plan.layer_inputs(layer)
            st = self._setup(layer_in, layer.ctx)
            z, t_init, t_cf = M.start(st["problem"], st["init"], self.closed_form)
            setups.append((layer.ctx.name, self._key(layer_in), st, z, t_init, t_cf))
        refined = M.refine_many([x[2]["problem"] for x in setups], [x[3] for x in setups], self.steps, self.lr)
        for (name, key, st, _z, t_init, t_cf), (z, best_t) in zip(setups, refined):
            self._pre[name] = (key, M.finish(st["problem"], z, best_t, t_init, t_cf), st["extra"])

    def input_model_obj(self) -> InputModel:
        if self._model is None:
            self._model = resolve_input_model(self.input_model, self.stats)
        return self._model

    @staticmethod
    def _key(inputs: Sequence[LayerInput]) -> tuple:
        return tuple((x.present, float(x.coeff), tuple(x.up.shape), tuple(x.down.shape)) for x in inputs)

    @staticmethod
    def _factors(inputs: Sequence[LayerInput]):
        return content_style_factors(inputs)

    def _setup(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> dict:
        bc, ac, bs, as_ = self._factors(inputs)
        axis = self.axis_for(ctx)
        weights, init, extra = self.layer_setup(ctx, ac.shape[0], as_.shape[0])
        problem = M.build_problem(axis, bc, ac, bs, as_, self.input_model_obj(), ctx.name, **weights)
        return {"axis": axis, "problem": problem, "init": init, "extra": extra}

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        if self._trained is not None:
            if ctx.name in self._trained.masks:
                return self._fold_learned(inputs, ctx)
            if ctx.name not in self._trained.skipped:
                self._trained.skipped.append(ctx.name)
        bc, ac, bs, as_ = self._factors(inputs)
        axis = self.axis_for(ctx)
        pre = self._pre.pop(ctx.name, None)
        if pre is not None and pre[0] == self._key(inputs):
            sol, extra = pre[1], pre[2]
            n_values = sol.mask_c.numel() + sol.mask_s.numel()
        else:
            st = self._setup(inputs, ctx)
            sol = M.solve(st["problem"], st["init"], closed_form=self.closed_form, steps=self.steps, lr=self.lr)
            extra, n_values = st["extra"], st["problem"].num_values
        if self.strength == "preserve":
            sol.mask_c, sol.mask_s = preserve_strength(sol.mask_c), preserve_strength(sol.mask_s)
        up, down = M.fold_pair(axis, bc, ac, bs, as_, sol.mask_c.to(ac.device), sol.mask_s.to(ac.device))
        self._record(ctx, n_values, sol)
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

    def _fold_learned(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        """The masks model mode learned for this layer, folded into the pair (strength applied once)."""
        axis = self.axis_for(ctx)
        mc, ms = self._trained.masks[ctx.name]
        if self.strength == "preserve":
            mc = None if mc is None else preserve_strength(mc)
            ms = None if ms is None else preserve_strength(ms)
        self._masks[f"{ctx.name}.mask_content"] = (mc if mc is not None else torch.ones(0)).contiguous()
        self._masks[f"{ctx.name}.mask_style"] = (ms if ms is not None else torch.ones(0)).contiguous()
        up, down, mc, ms = fold_masks(inputs, mc, ms, axis)
        info = {"mask_axis": axis, "mode": "model", "trainable_values": int(mc.numel() + ms.numel()),
                "mask_content_mean": float(mc.mean()) if mc.numel() else None,
                "mask_style_mean": float(ms.mean()) if ms.numel() else None}  # fmt: skip
        return LayerResult(up=up, down=down, info=info)

    def _record(self, ctx: LayerContext, n_values: int, sol: M.Solution) -> None:
        self._trainable += n_values
        self._layers += 1
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
        if self._trained is not None:
            self._add_model_report(rep)
        return rep

    def _add_model_report(self, rep: dict[str, Any]) -> None:
        trained = self._trained
        weight_space = rep.get("trainable_values", 0) or 0
        model_rep = trained.report()
        model_rep["weight_space_layers"] = model_rep.pop("not_trained")
        rep.update({"mode": "model", "model_mode": model_rep})
        rep["trainable_values"] = trained.num_trainable + int(weight_space)
        rep["layers"] = len(trained.masks) + len(trained.skipped)
        rep["input_model"] = "model (masks trained through the UNet)"
        blocks = rep.setdefault("blocks", {})
        for blk, means in model_rep["block_mean_masks"].items():
            n = sum(1 for name in trained.masks if (sub_block_of(name) or name) == blk)
            blocks["unet." + blk] = {"layers": n, "mask_content": means["content"], "mask_style": means["style"]}

    def sidecars(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every layer's masks, for the ``<output>.masks.safetensors`` sidecar (see docs)."""
        return {"masks": dict(self._masks)}


def preserve_strength(mask: torch.Tensor) -> torch.Tensor:
    """``mask / mean(mask)``: the same redistribution at the LoRA's own mean strength (a mask with mean
    ≤ 1e-6 — the LoRA switched off in this layer — is left as it is)."""
    if mask.numel() == 0:
        return mask
    mean = float(mask.float().mean())
    return mask if mean <= 1e-6 else mask / mean


def content_style_factors(inputs: Sequence[LayerInput]):
    """The pair convention of every two-input content–style strategy (``ziplora``, ``duolora``,
    ``np-lora``): input 1 is the content LoRA, input 2 the style LoRA.  Returns
    ``(B_c, w_c s_c A_c, B_s, w_s s_s A_s)`` with the strength applied once, on the down factors; an input
    that is absent or weighted 0 contributes rank-0 factors."""
    c, s = inputs
    ac, as_ = c.down * c.coeff, s.down * s.coeff
    if not c.present or c.coeff == 0:
        ac = c.down.new_zeros(0, c.down.shape[1])
    if not s.present or s.coeff == 0:
        as_ = s.down.new_zeros(0, s.down.shape[1])
    return c.up[:, : ac.shape[0]], ac, s.up[:, : as_.shape[0]], as_


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
