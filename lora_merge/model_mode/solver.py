"""The ``model`` solver of the pair-mask strategies (``ziplora --mode model``, ``duolora --mode model``):
train every UNet layer's masks jointly through the base model on reference images, as in the papers.

The strategies reach it by name (``lora_merge.strategies.pair_masks.SOLVERS``), so importing them never
imports diffusers.  :func:`train_pair_masks` returns the trained masks; the strategy folds them per
layer and solves the layers the UNet does not hold (a text encoder's) in weight space, listed in the
report.  Every training setting comes from the strategy's declared parameters: one default each.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import NotMainProcess, UsageError
from ..files import parse_dtype
from ..strategies.base import MergePlan
from ..strategies.pair_masks import check_model_inputs
from .base_model import load_base_model
from .mask_training import TrainConfig, TrainResult, check_precision, train_masks

__all__ = ["train_config", "train_pair_masks"]


def train_config(strategy: Any, seed: int = 0) -> TrainConfig:
    """A strategy's parameters as a :class:`TrainConfig`.  ZipLoRA has no prior or Constyle terms; the
    reverse Constyle cycle defaults to ``--lambda-cycle``."""
    cfg = strategy.config
    duo = strategy.name == "duolora"
    lam_cycle = float(cfg["lambda_cycle"]) if duo else 0.0
    lam_rev = cfg.get("lambda_rev")
    return TrainConfig(
        strategy=strategy.name,
        steps=int(cfg["steps"]),
        lr=float(cfg["lr"]),
        lambda_sim=float(cfg["lambda_sim"]),
        lambda_prior=float(cfg["lambda_prior"]) if duo else 0.0,
        lambda_hinge=float(cfg["lambda_hinge"]) if duo else 1.0,
        lambda_cycle=lam_cycle,
        lambda_rev=(lam_cycle if lam_rev is None else float(lam_rev)) if duo else 0.0,
        axis=str(cfg.get("axis") or "out"),
        priors=strategy.model_priors() if duo else None,
        prior_init=duo and bool(cfg["prior_init"]),
        batch_size=int(cfg["batch_size"]),
        seed=int(seed),
        mixed_precision=str(cfg["mixed_precision"]),
        cycle_prompt=cfg.get("cycle_prompt"),
    )


def train_pair_masks(strategy: Any, plan: MergePlan, *, progress: bool = True) -> TrainResult:
    """Load the strategy's ``--base`` model and train the masks of the plan's two inputs through it."""
    cfg = strategy.config
    check_model_inputs(cfg)
    if len(plan.adapters) != 2:
        raise UsageError(f"--mode model merges exactly 2 inputs (content, style), got {len(plan.adapters)}")
    tcfg = train_config(strategy, plan.seed)
    if strategy.name == "duolora" and cfg.get("priors") == "measure" and tcfg.priors is None:
        raise UsageError("--priors measure: the priors were not measured before training")
    tcfg.validate()
    check_precision(tcfg.mixed_precision, plan.device)
    dtype = torch.float32 if tcfg.mixed_precision == "no" else parse_dtype(tcfg.mixed_precision)
    base = load_base_model(cfg["base"], device=plan.device, dtype=dtype,
                           allow_pickle=bool(getattr(plan, "allow_pickle", False)))
    result = train_masks(
        base, plan.adapters, content_images=cfg["content_images"], content_prompt=cfg["content_prompt"],
        style_images=cfg["style_images"], style_prompt=cfg["style_prompt"], config=tcfg,
        weights=plan.coeffs, progress=progress,
    )  # fmt: skip
    if not result.is_main_process:  # accelerate launch: only the main process folds and writes the output
        raise NotMainProcess("not the main process of an accelerate launch; the main process writes the output")
    return result
