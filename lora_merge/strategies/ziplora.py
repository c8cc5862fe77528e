"""``ziplora``: one merge coefficient per output (or input) dimension, solved from the two files alone.

Shared machinery for the two-LoRA mask strategies (``ziplora`` here, ``duolora`` in duolora.py): the
objective, closed form and refinement live in :mod:`lora_merge.masks`; this module turns them into a
strategy with a report (trainable values, loss terms, per-block mean masks) and a mask sidecar.
Input 1 is the content LoRA, input 2 the style LoRA.  See docs/ziplora-duolora.md.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import masks as M
from ..input_models import INPUT_MODELS, InputModel, resolve_input_model
from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy, Param

#: per-layer mask lists longer than this go to the sidecar only (the JSON report gets summaries)
MAX_MASK_IN_INFO = 512

INPUT_PARAMS = (
    Param("input_model", str, "subspace", "model of each LoRA's inputs: subspace (each LoRA's own input "
          "subspace), identity, or stats (second moments from --stats FILE)", choices=INPUT_MODELS),
    Param("stats", str, None, "input statistics file (safetensors, see docs/ziplora-duolora.md) for "
          "--input-model stats"),
)  # fmt: skip


class PairMaskStrategy(MergeStrategy):
    """Base for two-input mask strategies.  Subclasses define ``axis_for`` and ``layer_setup``."""

    min_inputs = 2
    max_inputs = 2

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

    # ---- hooks for subclasses
    def axis_for(self, ctx: LayerContext) -> str:
        raise NotImplementedError

    def layer_setup(self, ctx: LayerContext, rc: int, rs: int) -> tuple[dict, tuple | None, dict]:
        """``(objective weights for build_problem, init masks or None for ones, extra info)``."""
        raise NotImplementedError

    # ---- engine hooks
    def prepare(self, inputs, context) -> None:
        self._reset()
        self._model = resolve_input_model(self.input_model, self.stats)

    def input_model_obj(self) -> InputModel:
        if self._model is None:
            self._model = resolve_input_model(self.input_model, self.stats)
        return self._model

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        c, s = inputs
        ac, as_ = c.down * c.coeff, s.down * s.coeff
        if not c.present or c.coeff == 0:
            ac = c.down.new_zeros(0, c.down.shape[1])
        if not s.present or s.coeff == 0:
            as_ = s.down.new_zeros(0, s.down.shape[1])
        bc = c.up[:, : ac.shape[0]]
        bs = s.up[:, : as_.shape[0]]
        axis = self.axis_for(ctx)
        weights, init, extra = self.layer_setup(ctx, ac.shape[0], as_.shape[0])
        problem = M.build_problem(axis, bc, ac, bs, as_, self.input_model_obj(), ctx.name, **weights)
        sol = M.solve(problem, init, closed_form=self.closed_form, steps=self.steps, lr=self.lr)
        up, down = M.fold_pair(axis, bc, ac, bs, as_, sol.mask_c.to(ac.device), sol.mask_s.to(ac.device))
        self._record(ctx, problem, sol)
        info: dict[str, Any] = {"mask_axis": axis, "trainable_values": problem.num_values, **extra}
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

    def _record(self, ctx: LayerContext, problem: M.MaskProblem, sol: M.Solution) -> None:
        self._trainable += problem.num_values
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
        return {
            "strategy": self.name,
            "trainable_values": self._trainable,
            "layers": self._layers,
            **self.input_model_obj().describe(),
            "loss_mean": {stage: {k: v / n for k, v in d.items()} for stage, d in self._loss.items()},
            "blocks": blocks,
            "mask_sidecar_keys": "<module>.mask_content / <module>.mask_style",
        }

    def mask_tensors(self) -> dict[str, torch.Tensor]:
        """Every layer's masks, for the ``<output>.masks.safetensors`` sidecar (see docs)."""
        return dict(self._masks)


@register
class ZipLoRA(PairMaskStrategy):
    name = "ziplora"
    description = ("ZipLoRA from the two files alone: a content and a style coefficient per output dimension, "
                   "closed form + Adam on the per-layer weight-space objective.")  # fmt: skip
    reference = "Shah et al., ZipLoRA, arXiv 2311.13600 (ECCV 2024); algorithms.md §5, §8"
    exact = False
    params = (
        Param("axis", str, "out", "mask over output dimensions (paper) or input dimensions (public code)",
              choices=("out", "in")),
        Param("lambda_sim", float, 0.01, "weight of the similarity term mean|m_c·m_s|", range=(0.0, None)),
        Param("closed_form", bool, True, "start from the closed-form minimizer of the quadratic part "
              "(off: start from all-ones masks, as the paper)"),
        Param("steps", int, 100, "Adam refinement steps on the full objective (0: closed form only)",
              range=(0, None)),
        Param("lr", float, 0.01, "Adam learning rate", range=(0.0, None)),
        *INPUT_PARAMS,
    )  # fmt: skip

    def axis_for(self, ctx: LayerContext) -> str:
        return self.axis

    def layer_setup(self, ctx, rc, rs):
        return {"lambda_sim": self.lambda_sim}, None, {}
