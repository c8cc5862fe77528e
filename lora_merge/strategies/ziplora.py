"""``ziplora``: one merge coefficient per output (or input) dimension, solved from the two files alone.

Shared machinery for the two-LoRA mask strategies (``ziplora`` here, ``duolora`` in duolora.py): the
objective, closed form and refinement live in :mod:`lora_merge.masks`; this module turns them into a
strategy with a report (trainable values, loss terms, per-block mean masks) and a mask sidecar.
Input 1 is the content LoRA, input 2 the style LoRA.  See docs/ziplora-duolora.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import masks as M
from ..input_models import INPUT_MODELS, InputModel, resolve_input_model
from ..model_mode.glue import ModelModeMixin  # --mode model (docs/model-mode.md)
from ..model_mode.params import ZIPLORA_MODEL_PARAMS
from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy, Param

#: per-layer mask lists longer than this go to the sidecar only (the JSON report gets summaries)
MAX_MASK_IN_INFO = 512

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
        self._pre: dict[str, tuple] = {}

    # ---- hooks for subclasses
    def axis_for(self, ctx: LayerContext) -> str:
        raise NotImplementedError

    def layer_setup(self, ctx: LayerContext, rc: int, rs: int) -> tuple[dict, tuple | None, dict]:
        """``(objective weights for build_problem, init masks or None for ones, extra info)``."""
        raise NotImplementedError

    # ---- engine hooks
    def prepare(self, inputs, context) -> None:
        """Resolve the input model and, when the engine tells the plan, solve every layer up front so the
        Adam refinement runs vectorized over all layers (:func:`lora_merge.masks.refine_many`).
        :meth:`merge_layer` uses a precomputed answer only if its inputs match what was precomputed."""
        self._reset()
        self._model = resolve_input_model(self.input_model, self.stats)
        plan = context.get("plan")
        if not plan or "weights" not in context:
            return
        from ..arch import resolution_of, sub_block_of
        from ..engine import _layer_inputs  # the engine's own construction of LayerInputs
        from ..patterns import compile_pattern

        arch, dev = context.get("arch"), context.get("device") or torch.device("cpu")
        setups = []
        for idx, name in enumerate(plan):
            shape_mod = next(ad.modules[name] for ad in inputs if name in ad.modules)
            coeffs = list(context["weights"])
            for pattern, vals in context.get("layer_weights") or ():
                if compile_pattern(pattern).search(name):
                    coeffs = [c * v for c, v in zip(coeffs, vals)]
            ctx = LayerContext(name=name, index=idx, block=sub_block_of(name), resolution=resolution_of(name, arch),
                               arch=arch, kind=shape_mod.kind, weight_shape=shape_mod.weight_shape,
                               seed=int(context.get("seed", 0)), device=torch.device(dev))  # fmt: skip
            layer_in = _layer_inputs(inputs, name, shape_mod, coeffs, ctx.device)
            st = self._setup(layer_in, ctx)
            z, t_init, t_cf = M.start(st["problem"], st["init"], self.closed_form)
            setups.append((name, self._key(layer_in), st, z, t_init, t_cf))
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
        c, s = inputs
        ac, as_ = c.down * c.coeff, s.down * s.coeff
        if not c.present or c.coeff == 0:
            ac = c.down.new_zeros(0, c.down.shape[1])
        if not s.present or s.coeff == 0:
            as_ = s.down.new_zeros(0, s.down.shape[1])
        return c.up[:, : ac.shape[0]], ac, s.up[:, : as_.shape[0]], as_

    def _setup(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> dict:
        bc, ac, bs, as_ = self._factors(inputs)
        axis = self.axis_for(ctx)
        weights, init, extra = self.layer_setup(ctx, ac.shape[0], as_.shape[0])
        problem = M.build_problem(axis, bc, ac, bs, as_, self.input_model_obj(), ctx.name, **weights)
        return {"axis": axis, "problem": problem, "init": init, "extra": extra}

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        bc, ac, bs, as_ = self._factors(inputs)
        axis = self.axis_for(ctx)
        pre = self._pre.pop(ctx.name, None)
        if pre is not None and pre[0] == self._key(inputs):
            sol, extra = pre[1], pre[2]
            n_values = (sol.mask_c.numel() + sol.mask_s.numel())
        else:
            st = self._setup(inputs, ctx)
            sol = M.solve(st["problem"], st["init"], closed_form=self.closed_form, steps=self.steps, lr=self.lr)
            extra, n_values = st["extra"], st["problem"].num_values
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
        return {
            "strategy": self.name,
            "trainable_values": self._trainable,
            "layers": self._layers,
            **self.input_model_obj().describe(),
            "loss_mean": {stage: {k: v / n for k, v in d.items()} for stage, d in self._loss.items()},
            "blocks": blocks,
            "mask_sidecar_keys": "<module>.mask_content / <module>.mask_style",
        }

    @classmethod
    def render_report(cls, report: dict[str, Any]):
        """A rich table for the merge CLI: per-block mean masks and retention, trainable values, losses."""
        from rich.table import Table

        strat = report.get("strategy") or {}
        layers = report.get("layers") or {}
        t = Table(title=f"{strat.get('strategy', cls.name)}: {strat.get('trainable_values', 0):,} trainable values, "
                        f"input model {strat.get('input_model', '?')}")  # fmt: skip
        for col in ("block", "layers", "role", "mask content", "mask style", "retention content", "retention style"):
            t.add_column(col, justify="left" if col in ("block", "role") else "right", no_wrap=col == "block")
        acc: dict[str, dict[str, list]] = {}
        for name, info in layers.items():
            from ..arch import sub_block_of

            blk = sub_block_of(name) or "other"
            a = acc.setdefault(blk, {"role": set(), "rc": [], "rs": []})
            a["role"].add(info.get("role", "-"))
            ret = info.get("retention") or {}
            if ret.get("content") is not None:
                a["rc"].append(ret["content"])
            if ret.get("style") is not None:
                a["rs"].append(ret["style"])

        def mean(x):
            return f"{sum(x) / len(x):.4f}" if x else "-"

        for blk, b in (strat.get("blocks") or {}).items():
            a = acc.get(blk, {"role": {"-"}, "rc": [], "rs": []})
            t.add_row(blk, str(b["layers"]), ",".join(sorted(a["role"])), f"{b['mask_content']:.3f}",
                      f"{b['mask_style']:.3f}", mean(a["rc"]), mean(a["rs"]))  # fmt: skip
        loss = strat.get("loss_mean") or {}
        if "init" in loss and "final" in loss:
            t.caption = (f"mean loss per layer: {loss['init']['total']:.4g} (init) → {loss['final']['total']:.4g} "
                         f"(final); masks in <output>.masks.safetensors")  # fmt: skip
        return t

    def mask_tensors(self) -> dict[str, torch.Tensor]:
        """Every layer's masks, for the ``<output>.masks.safetensors`` sidecar (see docs)."""
        return dict(self._masks)


@register
class ZipLoRA(ModelModeMixin, PairMaskStrategy):
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
        *REFINE_PARAMS,
        *INPUT_PARAMS,
        *ZIPLORA_MODEL_PARAMS,
    )  # fmt: skip

    def axis_for(self, ctx: LayerContext) -> str:
        return self.axis

    def layer_setup(self, ctx, rc, rs):
        return {"lambda_sim": self.lambda_sim}, None, {}
