"""``timestep-split``: a sampling-time merge that gives the layout steps to the subject and the texture
steps to the style.

Diffusion samplers decide the coarse layout (the subject's shape) at high noise and the fine texture (the
style) at low noise; a content–style merge fails when each LoRA also carries the other's job — the style
LoRA trained on one reference image draws that image's object, the content LoRA its photos' look
(docs/quality.md).  So switch the strengths with the denoising progress ``p = 1 − t/T`` (``t`` the real
timestep the model is called with, as in :mod:`lora_merge.klora`)::

    p <  switch:   ΔW = e_c · ΔW_c + e_s · ΔW_s        (early: layout)
    p >= switch:   ΔW = l_c · ΔW_c + l_s · ΔW_s        (late: texture)

with ``ΔW_i = w_i · (alpha_i/r_i) · B_i A_i``.  The defaults were chosen on the suite's *validation* seeds
(docs/strategies.md, "timestep-split").  Like K-LoRA it needs the sampling loop and cannot be saved as one
LoRA file.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .adapter import Adapter
from .errors import UsageError
from .klora import KLoRA, StepRecord, _Layer, denoising_progress, lora_output

#: the default schedule (chosen on validation seeds; docs/strategies.md)
DEFAULT_SWITCH = 0.75
DEFAULT_EARLY = (1.0, 0.25)
DEFAULT_LATE = (0.0, 1.0)

SPEC: dict[str, Any] = {
    "name": "timestep-split",
    "description": "layout steps to the subject, texture steps to the style: strengths (early_c, early_s) "
                   "before the switch point of the denoising, (late_c, late_s) after it, following the "
                   "sampler's real timestep",
    "reference": "docs/strategies.md, 'timestep-split' (this project; motivated by K-LoRA's content-early, "
                 "style-late schedule and the suite's leakage measurements)",
    "static_file": False,
    "api": "from lora_merge.timestep_merge import TimestepSplit; TimestepSplit.attach(pipe.unet, content, style)",
    "params": [
        {"name": "switch", "type": "float", "default": DEFAULT_SWITCH,
         "help": "fraction of the denoising (p = 1 − t/T) at which the late strengths take over"},
        {"name": "early", "type": "(float, float)", "default": list(DEFAULT_EARLY),
         "help": "(content, style) strengths while p < switch"},
        {"name": "late", "type": "(float, float)", "default": list(DEFAULT_LATE),
         "help": "(content, style) strengths while p ≥ switch"},
        {"name": "weights", "type": "(float, float)", "default": [1.0, 1.0],
         "help": "user strengths w_c, w_s (multiply both phases)"},
    ],
}


class TimestepSplit(KLoRA):
    """Two LoRAs whose strengths switch at one point of the denoising.  ``TimestepSplit.attach(unet,
    content, style, switch=0.5, early=(1, 0), late=(1, 1))``; ``detach()`` restores the model.  ``records``
    holds, per model call, the phase (``"early"``/``"late"``) of every hooked layer."""

    def __init__(self, content: Adapter, style: Adapter, *, switch: float = DEFAULT_SWITCH,
                 early: Sequence[float] = DEFAULT_EARLY, late: Sequence[float] = DEFAULT_LATE,
                 weights: Sequence[float] = (1.0, 1.0), num_train_timesteps: float | None = None, device=None):
        if not 0.0 <= float(switch) <= 1.0:
            raise UsageError(f"timestep-split: switch must be in [0, 1] (a fraction of the denoising), got {switch}")
        for what, pair in (("early", early), ("late", late)):
            if len(pair) != 2:
                raise UsageError(f"timestep-split: {what} takes two strengths (content, style), got {len(pair)}")
        super().__init__(content, style, gamma=1.0, weights=weights, num_train_timesteps=num_train_timesteps,
                         device=device)
        self.switch = float(switch)
        self.early = (float(early[0]), float(early[1]))
        self.late = (float(late[0]), float(late[1]))

    def phase(self, timestep: float) -> str:
        return "early" if denoising_progress(timestep, self._T) < self.switch else "late"

    def _record(self, t: float) -> StepRecord:
        return StepRecord(t, denoising_progress(t, self._T), 0.0,
                          dict.fromkeys(self.layers, self.phase(t)))  # type: ignore[arg-type]

    def _extra(self, layer: _Layer, rec: StepRecord, x: torch.Tensor) -> torch.Tensor:
        strengths = self.early if rec.choices[layer.name] == "early" else self.late
        out = torch.zeros((), dtype=x.dtype, device=x.device)
        for concept, s in zip(("content", "style"), strengths):
            if s != 0.0 and concept in layer.bound:
                out = out + s * lora_output(layer, concept, x)
        return out

    def report(self) -> dict[str, Any]:
        return {"method": "timestep-split", "switch": self.switch, "early": list(self.early),
                "late": list(self.late), "weights": list(self.weights), "num_train_timesteps": self._T,
                "skipped_modules": list(self.skipped),
                "steps": [{"timestep": r.timestep, "progress": r.progress,
                           "phase": next(iter(r.choices.values()), None)} for r in self.records]}


__all__ = ["DEFAULT_EARLY", "DEFAULT_LATE", "DEFAULT_SWITCH", "SPEC", "TimestepSplit"]
