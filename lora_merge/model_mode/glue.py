"""How ``ziplora``/``duolora`` use model mode: train all masks in ``prepare()``, fold them per layer.

A strategy with ``mode == "model"`` calls :func:`train_for_strategy` once from ``prepare()`` and
:func:`fold_learned` from ``merge_layer()`` for every layer the training covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UsageError
from .params import MODEL_MODE_PARAMS, REQUIRED_IN_MODEL_MODE
from .mask_training import TrainConfig, TrainResult, check_precision

#: paper defaults per strategy (algorithms.md §5–6): ZipLoRA λ=0.01, no priors, no cycles;
#: DuoLoRA λ_cycle 0.01, λ_prior 0.1, Adam lr 0.01; both 100 steps
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "ziplora": {"steps": 100, "lr": 0.01, "lambda_sim": 0.01, "lambda_prior": 0.0, "lambda_cycle": 0.0},
    "duolora": {"steps": 100, "lr": 0.01, "lambda_sim": 0.01, "lambda_prior": 0.1, "lambda_cycle": 0.01},
}


def check_model_inputs(config: dict[str, Any]) -> None:
    """Model mode with a missing input is a usage error (never a silent fallback to weight space)."""
    missing = [k for k in REQUIRED_IN_MODEL_MODE if not config.get(k)]
    if missing:
        raise UsageError("--mode model needs " + ", ".join("--" + k.replace("_", "-") for k in missing))


def check_weights_mode(config: dict[str, Any]) -> None:
    """Model-mode options given without ``--mode model`` are a usage error (they would be ignored)."""
    defaults = {p.name: p.default for p in MODEL_MODE_PARAMS if p.name != "mode"}
    given = [k for k, d in defaults.items() if config.get(k) is not None and config.get(k) != d]
    if (
        config.get("priors") == "measure"
    ):  # --priors measure runs the base model on the references (docs/priors.md)
        given = [k for k in given if k not in REQUIRED_IN_MODEL_MODE]
    if given:
        raise UsageError(
            ", ".join("--" + k.replace("_", "-") for k in given) + " only apply with --mode model"
        )


def _pick(config: dict[str, Any], names: Sequence[str], default: Any) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


def train_config(strategy: str, config: dict[str, Any], seed: int = 0) -> TrainConfig:
    """Map a strategy's parameters onto a :class:`TrainConfig` (paper defaults for unset values)."""
    d = MODEL_DEFAULTS[strategy]
    lam_cycle = float(_pick(config, ("lambda_cycle",), d["lambda_cycle"]))
    priors = _pick(config, ("priors",), "auto")
    return TrainConfig(
        strategy=strategy,
        steps=int(_pick(config, ("steps",), d["steps"])),
        lr=float(_pick(config, ("lr",), d["lr"])),
        lambda_sim=float(_pick(config, ("lambda_sim",), d["lambda_sim"])),
        lambda_prior=float(_pick(config, ("lambda_prior",), d["lambda_prior"]))
        if strategy == "duolora"
        else 0.0,
        lambda_hinge=float(_pick(config, ("lambda_hinge",), 1.0)),
        lambda_cycle=lam_cycle if strategy == "duolora" else 0.0,
        lambda_rev=float(_pick(config, ("lambda_rev",), lam_cycle)) if strategy == "duolora" else 0.0,
        axis=str(_pick(config, ("axis",), "out")),
        priors=priors if strategy == "duolora" else None,
        prior_init=strategy == "duolora" and bool(_pick(config, ("prior_init",), True)),
        batch_size=int(_pick(config, ("batch_size",), 1)),
        seed=int(seed),
        mixed_precision=str(_pick(config, ("mixed_precision",), "no")),
        cycle_prompt=config.get("cycle_prompt"),
    )


def layer_weight_fn(context: dict[str, Any], n: int):
    """Per-layer input weights exactly as the engine computes them (global weights × matching patterns)."""
    from ..patterns import compile_pattern

    w = [float(x) for x in (context.get("weights") or [1.0] * n)]
    lw = [(compile_pattern(p), [float(v) for v in vals]) for p, vals in (context.get("layer_weights") or ())]

    def weight_of(name: str) -> list[float]:
        coeffs = list(w)
        for rx, vals in lw:
            if rx.search(name):
                coeffs = [c * v for c, v in zip(coeffs, vals)]
        return coeffs

    return weight_of


def train_for_strategy(strategy: Any, adapters: Sequence[Any], context: dict[str, Any]) -> TrainResult:
    """Load the base model and train the masks of ``strategy`` (its ``config``) on the engine's inputs."""
    from .base_model import load_base_model
    from .mask_training import train_masks

    cfg = dict(strategy.config)
    check_model_inputs(cfg)
    if len(adapters) != 2:
        raise UsageError(f"--mode model merges exactly 2 inputs (content, style), got {len(adapters)}")
    tcfg = train_config(strategy.name, cfg, context.get("seed", 0))
    if tcfg.priors == "measure":  # measured by the strategy's prepare() (lora_merge.priors_measure)
        tcfg.priors = getattr(strategy, "measured_priors", None)
        if tcfg.priors is None:
            raise UsageError("--priors measure: the strategy did not measure the priors before training")
    tcfg.validate()
    check_precision(tcfg.mixed_precision, context.get("device", "cpu"))
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[tcfg.mixed_precision]
    base = load_base_model(cfg["base"], device=context.get("device", "cpu"), dtype=dtype)
    return train_masks(
        base, adapters, content_images=cfg["content_images"], content_prompt=cfg["content_prompt"],
        style_images=cfg["style_images"], style_prompt=cfg["style_prompt"], config=tcfg,
        weights=layer_weight_fn(context, len(adapters)), progress=bool(context.get("progress", True)),
    )  # fmt: skip


def fold_learned(inputs: Sequence[Any], masks: Sequence[torch.Tensor | None], axis: str):
    """Fold learned masks into the engine's two :class:`LayerInput` (strength applied once, as in
    ``ziplora``/``duolora``) with :func:`lora_merge.masks.fold_pair`: a standard rank ``r_c + r_s`` LoRA."""
    from .. import masks as M
    from ..strategies.base import LayerResult

    c, s = inputs
    mc, ms = masks
    ac, as_ = c.down * c.coeff, s.down * s.coeff
    dev = ac.device
    mc = torch.ones(0) if mc is None else mc
    ms = torch.ones(0) if ms is None else ms
    if not c.present:
        ac, mc = c.down.new_zeros(0, c.down.shape[1]), torch.ones(0) if axis == "rank" else mc
    if not s.present:
        as_, ms = s.down.new_zeros(0, s.down.shape[1]), torch.ones(0) if axis == "rank" else ms
    up, down = M.fold_pair(
        axis, c.up[:, : ac.shape[0]], ac, s.up[:, : as_.shape[0]], as_, mc.to(dev), ms.to(dev)
    )
    info = {"mask_axis": axis, "mode": "model", "trainable_values": int(mc.numel() + ms.numel()),
            "mask_content_mean": float(mc.mean()) if mc.numel() else None,
            "mask_style_mean": float(ms.mean()) if ms.numel() else None}  # fmt: skip
    return LayerResult(up=up, down=down, info=info)


# ------------------------------------------------------------------ hooks the mask strategies call
def prepare(strategy: Any, inputs: Sequence[Any], context: dict[str, Any]) -> TrainResult | None:
    """From ``prepare()``: train in model mode (returns the result), check the options in weights mode."""
    if strategy.config.get("mode", "weights") != "model":
        check_weights_mode(strategy.config)
        return None
    result = train_for_strategy(strategy, inputs, context)
    if not result.is_main_process:  # accelerate launch: only the main process folds and writes the output
        raise SystemExit(0)
    return result


def merge_layer(strategy: Any, trained: TrainResult | None, inputs: Sequence[Any], ctx: Any):
    """From ``merge_layer()``: the folded learned masks for a trained layer, else None (a layer outside
    the UNet, e.g. a text encoder's, which the strategy then solves in weight space and the report lists)."""
    if trained is None or ctx.name not in trained.masks:
        if trained is not None and ctx.name not in trained.skipped:
            trained.skipped.append(ctx.name)
        return None
    masks = trained.masks[ctx.name]
    return fold_learned(inputs, masks, strategy.axis_for(ctx))


def report(trained: TrainResult | None) -> dict[str, Any]:
    """Extra report entries in model mode (loss curve, before/after objective, masks per block)."""
    if trained is None:
        return {}
    rep = trained.report()
    rep["weight_space_layers"] = rep.pop("not_trained")
    return {"mode": "model", "model_mode": rep}


def sub_block_of(name: str) -> str | None:
    from ..arch import sub_block_of as f

    return f(name)


class ModelModeMixin:
    """Adds ``--mode model`` to a two-input mask strategy (``ziplora``, ``duolora``): list it before the
    strategy's base class and add :data:`~lora_merge.model_mode.params.MODEL_MODE_PARAMS` to its params.

    ``prepare`` trains every UNet layer's masks jointly through the base model; ``merge_layer`` folds the
    learned masks (layers outside the UNet go to the strategy's weight-space solve and are listed in the
    report); ``report`` adds the training report under ``model_mode``.
    """

    def prepare(self, inputs, context) -> None:
        if self.config.get("mode") == "model":
            # no up-front weight-space solve of every layer: only layers outside the UNet need one, and
            # the strategy solves those on demand in merge_layer
            super().prepare(inputs, {**context, "plan": None})
        else:
            super().prepare(inputs, context)
        self._trained = prepare(self, inputs, context)

    def merge_layer(self, inputs, ctx):
        trained = getattr(self, "_trained", None)
        res = merge_layer(self, trained, inputs, ctx)
        if res is None:
            return super().merge_layer(inputs, ctx)
        masks = getattr(self, "_masks", None)
        if isinstance(masks, dict):  # the strategy's mask sidecar, same keys as in weight space
            mc, ms = trained.masks[ctx.name]
            masks[f"{ctx.name}.mask_content"] = (mc if mc is not None else torch.ones(0)).contiguous()
            masks[f"{ctx.name}.mask_style"] = (ms if ms is not None else torch.ones(0)).contiguous()
        return res

    def report(self) -> dict[str, Any]:
        rep = super().report()
        trained = getattr(self, "_trained", None)
        if trained is not None:
            weight_space = rep.get("trainable_values", 0) or 0
            rep.update(report(trained))
            rep["trainable_values"] = trained.num_trainable + int(weight_space)
            rep["layers"] = len(trained.masks) + len(trained.skipped)
            rep["input_model"] = "model (masks trained through the UNet)"
            blocks = rep.setdefault("blocks", {})
            for blk, means in rep["model_mode"]["block_mean_masks"].items():
                n = sum(1 for name in trained.masks if (sub_block_of(name) or name) == blk)
                blocks["unet." + blk] = {
                    "layers": n,
                    "mask_content": means["content"],
                    "mask_style": means["style"],
                }
        return rep
