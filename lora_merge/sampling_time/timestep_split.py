"""``timestep-split``: a sampling-time merge that gives the layout steps to the subject and the texture
steps to the style.

Diffusion samplers decide the coarse layout (the subject's shape) at high noise and the fine texture (the
style) at low noise; a content–style merge fails when each LoRA also carries the other's job — the style
LoRA trained on one reference image draws that image's object, the content LoRA its photos' look
(docs/quality.md).  So switch the strengths with the denoising progress ``p = 1 − t/T`` (``t`` the real
timestep the model is called with, read by the shared hooks of :mod:`lora_merge.sampling_time.hooks`)::

    p <  switch:   ΔW = e_c · ΔW_c + e_s · ΔW_s        (early: layout)
    p >= switch:   ΔW = l_c · ΔW_c + l_s · ΔW_s        (late: texture)

with ``ΔW_i = w_i · (alpha_i/r_i) · B_i A_i``.  The defaults were chosen on the suite's *validation* seeds
(docs/strategies.md, "timestep-split").  Like K-LoRA it needs the sampling loop and cannot be saved as one
LoRA file.
"""
from __future__ import annotations

from typing import Any

import torch

from ..strategies.base import Param
from .base import NUM_TRAIN_TIMESTEPS, STRENGTHS, WEIGHTS, SamplingTimeMerger
from .hooks import CONCEPTS, Layer, StepRecord, denoising_progress, lora_output
from .registry import register_sampling_time

__all__ = ["DEFAULT_EARLY", "DEFAULT_LATE", "DEFAULT_SWITCH", "TimestepSplit"]

_SWITCH = Param("switch", float, 0.75, "fraction of the denoising (p = 1 − t/T) at which the late strengths "
                "take over", range=(0.0, 1.0))
_EARLY = Param("early", STRENGTHS, (1.0, 0.25), "(content, style) strengths while p < switch")  # type: ignore[arg-type]
_LATE = Param("late", STRENGTHS, (0.0, 1.0), "(content, style) strengths while p ≥ switch")  # type: ignore[arg-type]
#: the default schedule (chosen on validation seeds; docs/strategies.md): the Params' defaults
DEFAULT_SWITCH: float = _SWITCH.default
DEFAULT_EARLY: tuple[float, float] = _EARLY.default
DEFAULT_LATE: tuple[float, float] = _LATE.default


@register_sampling_time
class TimestepSplit(SamplingTimeMerger):
    """Two LoRAs whose strengths switch at one point of the denoising.  ``TimestepSplit.attach(unet,
    content, style, switch=0.5, early=(1, 0), late=(1, 1))``; ``detach()`` restores the model.  ``records``
    holds, per model call, the phase (``"early"``/``"late"``) of every hooked layer."""

    name = "timestep-split"
    description = ("layout steps to the subject, texture steps to the style: strengths (early_c, early_s) "
                   "before the switch point of the denoising, (late_c, late_s) after it, following the "
                   "sampler's real timestep")
    reference = ("docs/strategies.md, 'timestep-split' (this project; motivated by K-LoRA's content-early, "
                 "style-late schedule and the suite's leakage measurements)")
    params = (_SWITCH, _EARLY, _LATE, WEIGHTS, NUM_TRAIN_TIMESTEPS)

    def setup(self, device: Any = None) -> None:
        self.switch = float(self.config["switch"])
        self.early: tuple[float, float] = tuple(self.config["early"])  # type: ignore[assignment]
        self.late: tuple[float, float] = tuple(self.config["late"])  # type: ignore[assignment]

    def phase(self, timestep: float) -> str:
        return "early" if denoising_progress(timestep, self.T) < self.switch else "late"

    def step_record(self, t: float) -> StepRecord:
        return StepRecord(t, denoising_progress(t, self.T), 0.0, dict.fromkeys(self.layers, self.phase(t)))

    def layer_extra(self, layer: Layer, record: StepRecord, x: torch.Tensor) -> torch.Tensor:
        strengths = self.early if record.choices[layer.name] == "early" else self.late
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        for concept, s in zip(CONCEPTS, strengths):
            if s != 0.0 and concept in layer.bound:
                out = out + s * lora_output(layer, concept, x)
        return out

    def report(self) -> dict[str, Any]:
        return {"method": "timestep-split", "switch": self.switch, "early": list(self.early),
                "late": list(self.late), "weights": list(self.weights), "num_train_timesteps": self.T,
                "skipped_modules": list(self.skipped),
                "steps": [{"timestep": r.timestep, "progress": r.progress,
                           "phase": next(iter(r.choices.values()), None)} for r in self.records]}
