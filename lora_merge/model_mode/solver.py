"""The ``model`` mask solver (``--mode model``): train every UNet layer's masks jointly through the base
model on the reference images, as in the ZipLoRA and DuoLoRA papers.

The pair-mask strategies reach it by name (``lora_merge.strategies.mask_solvers.SOLVERS``), so importing
them never imports diffusers.  :class:`ModelSolver` receives the strategy's
:class:`~lora_merge.masks.MaskObjective` — it knows no strategy by name — and returns the trained masks;
the strategy folds them per layer and solves the layers the UNet does not hold (a text encoder's) in
weight space, listed in the report.
"""

from __future__ import annotations

import torch

from ..errors import NotMainProcess, UsageError
from ..files import parse_dtype
from ..masks import LayerMasks, MaskObjective, MaskSolution, References, SolveOptions
from ..strategies.base import MergePlan
from .base_model import load_base_model
from .mask_training import MIXED_PRECISION, TrainResult, check_precision, train_masks

__all__ = ["ModelSolver", "check_options"]


def check_options(options: SolveOptions) -> None:
    """The model solver's own settings: a base model, a known precision, at least one image per step."""
    if options.mixed_precision not in MIXED_PRECISION:
        raise UsageError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
    if options.batch_size is None or int(options.batch_size) < 1:
        raise UsageError("--batch-size must be >= 1")
    check_precision(options.mixed_precision, options.device)


class ModelSolver:
    """``--mode model``: load ``options.base`` and train the masks of the plan's two inputs through it."""

    name = "model"

    def solve(self, objective: MaskObjective, plan: MergePlan, references: References | None,
              options: SolveOptions) -> MaskSolution:  # fmt: skip
        missing = [] if options.base else ["--base"]
        for role in ("content", "style"):
            concept = getattr(references, role, None)
            missing += [f"--{role}-{what}" for what, value in (("images", getattr(concept, "images", None)),
                                                             ("prompt", getattr(concept, "prompt", None)))
                        if value is None or (isinstance(value, str) and not value.strip())]  # fmt: skip
        if missing:  # a usage error, never a silent fallback to weight space
            raise UsageError("--mode model needs " + ", ".join(missing))
        if len(plan.adapters) != 2:
            raise UsageError(f"--mode model merges exactly 2 inputs (content, style), got {len(plan.adapters)}")
        if isinstance(objective.priors, str) and objective.priors == "measure":
            raise UsageError("--priors measure: the priors were not measured before training")
        check_options(options)
        dtype = torch.float32 if options.mixed_precision == "no" else parse_dtype(options.mixed_precision)
        base = load_base_model(options.base, device=plan.device, dtype=dtype, allow_pickle=options.allow_pickle)
        result = train_masks(base, plan.adapters, references, objective, options, weights=plan.coeffs)
        if not result.is_main_process:  # accelerate launch: only the main process folds and writes the output
            raise NotMainProcess("not the main process of an accelerate launch; the main process writes the output")
        return to_solution(result, self.name)


def to_solution(result: TrainResult, solver: str = "model") -> MaskSolution:
    """A :class:`TrainResult` as the strategies' :class:`MaskSolution`."""
    layers = {n: LayerMasks(ms[0], ms[1]) for n, ms in result.masks.items()}
    return MaskSolution(layers=layers, skipped=result.skipped, details=result, solver=solver)
