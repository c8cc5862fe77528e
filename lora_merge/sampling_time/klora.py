"""K-LoRA (Ouyang, Li, Hou, CVPR 2025): a *sampling-time* fusion of a content LoRA and a style LoRA.

At every LoRA'd layer and every denoising step the layer applies **either** the content update ΔW_c
**or** the style update ΔW_s, never a mix:

    S_c = Σ Top-K |ΔW_c|,   S_s = Σ Top-K |ΔW_s|,   K = r_c · r_s           (per layer, once)
    p(t) = 1 − t / T                                 (fraction of the denoising done: 0 at noise, 1 at the end)
    σ(t) = α · p(t) + β                              (α = 1.5, β = 0.5: σ runs from 0.5 to 2)
    layer uses ΔW_c  if  S_c ≥ γ · σ(t) · S_s,  else ΔW_s

with ``ΔW_i = w_i · (alpha_i / r_i) · B_i A_i`` (the LoRA scale applied once, times the user weight).
Early in sampling (``t`` near ``T``, σ ≈ 0.5) the style score is discounted, so the content LoRA wins
most layers and lays down the subject; late (``t`` near 0, σ ≈ 2) the style score counts double and the
style LoRA takes over the texture.  ``γ`` balances the two LoRAs' overall magnitudes; ``gamma="auto"``
(the default) is ``Σ_L S_c(L) / Σ_L S_s(L)`` over the layers both LoRAs have.

``t`` is the timestep the model is actually called with and ``T`` the scheduler's
``num_train_timesteps``: the schedule follows the sampler, whatever its step count or spacing.  (The
authors' code counts layer calls and assumes 50 steps; this module does not.)  The hooks are the shared
ones of :mod:`lora_merge.sampling_time.hooks`.

Nothing here can be saved as one LoRA file: the choice changes with the timestep.  See
docs/strategies.md, "Sampling-time merging: K-LoRA".
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from ..adapter import LoraModule
from ..strategies.base import Param
from .base import FLOAT_OR_AUTO, NUM_TRAIN_TIMESTEPS, WEIGHTS, SamplingTimeMerger
from .hooks import Layer, StepRecord, denoising_progress, lora_output
from .registry import register_sampling_time

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "KLoRA",
    "choose",
    "layer_scores",
    "style_scale",
    "topk_abs_sum",
]

Concept = Literal["content", "style"]

_ALPHA = Param("alpha", float, 1.5, "σ(t) = alpha · (1 − t/T) + beta")
_BETA = Param("beta", float, 0.5, "σ(t) = alpha · (1 − t/T) + beta")
#: σ(t) = α · (1 − t/T) + β: the paper's scaling factor, with its 1.5 and 0.5 (the Params' defaults)
DEFAULT_ALPHA: float = _ALPHA.default
DEFAULT_BETA: float = _BETA.default


# ------------------------------------------------------------------------------------------ the math
def topk_abs_sum(delta: torch.Tensor, k: int) -> float:
    """Σ of the ``k`` largest ``|ΔW|`` entries (``ΔW`` flattened; ``k`` clipped to ``[1, numel]``)."""
    flat = delta.detach().reshape(-1).abs().float()
    if flat.numel() == 0:
        return 0.0
    k = max(1, min(int(k), flat.numel()))
    return float(torch.topk(flat, k, sorted=False).values.sum())


def style_scale(timestep: float, num_train_timesteps: float, alpha: float = DEFAULT_ALPHA,
                beta: float = DEFAULT_BETA) -> float:
    """σ(t) = α · (1 − t/T) + β: 0.5 at the first (noisiest) step, 2 at the last with the defaults."""
    return alpha * denoising_progress(timestep, num_train_timesteps) + beta


def choose(score_content: float, score_style: float, timestep: float, num_train_timesteps: float,
           gamma: float, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA) -> Concept:
    """``"content"`` if ``S_c ≥ γ · σ(t) · S_s``, else ``"style"``."""
    scaled = gamma * style_scale(timestep, num_train_timesteps, alpha, beta) * score_style
    return "content" if score_content >= scaled else "style"


def _weighted_delta(mod: LoraModule, weight: float, device=None) -> torch.Tensor:
    return mod.delta(torch.float32, device, flat=False) * float(weight)


def layer_scores(content: LoraModule, style: LoraModule, weights: Sequence[float] = (1.0, 1.0),
                 device=None) -> tuple[float, float, int]:
    """``(S_c, S_s, K)`` of one layer, ``K = r_c · r_s``, on ``ΔW_i = w_i · scale_i · B_i A_i``."""
    k = content.rank * style.rank
    s_c = topk_abs_sum(_weighted_delta(content, weights[0], device), k)
    s_s = topk_abs_sum(_weighted_delta(style, weights[1], device), k)
    return s_c, s_s, k


# ------------------------------------------------------------------------------------------ the merger
@register_sampling_time
class KLoRA(SamplingTimeMerger):
    """K-LoRA over a content and a style :class:`~lora_merge.adapter.Adapter`.

    ``KLoRA.attach(unet, content, style, gamma="auto", weights=(1, 1))`` returns an attached instance;
    ``KLoRA(content, style, ...)`` builds one unattached, and ``.attach(unet, scheduler=...)`` binds it
    later.  Forward hooks add the chosen ``ΔW·x`` (from the factors: ``B(Ax)``) to each targeted
    ``nn.Linear``/``nn.Conv2d``; the base weights are never touched.  A forward pre-hook on the top
    module reads the timestep of each call (``timestep=`` or the 2nd positional argument; a number or a
    tensor whose entries are equal).  ``detach()`` removes every hook.  ``records`` holds one
    :class:`StepRecord` per model call since the last ``attach``.  Also a context manager
    (``with KLoRA.attach(...) as k: ...`` detaches at the end).  ``gamma`` is the γ in use (``"auto"``
    resolved); ``config["gamma"]`` the setting.
    """

    name = "k-lora"
    label = "K-LoRA"
    description = ("K-LoRA: per layer and per denoising step, apply the content OR the style LoRA, whichever "
                   "has the larger sum of its top-K |ΔW| entries (style scaled by γ and the timestep); content "
                   "early, style late")
    reference = ("Ouyang, Li, Hou: K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs, "
                 "CVPR 2025 (arXiv:2502.18461)")
    params = (
        Param("gamma", FLOAT_OR_AUTO, "auto",  # type: ignore[arg-type]
              "γ: style score multiplier; auto = Σ S_c / Σ S_s over the shared layers"),
        WEIGHTS,
        _ALPHA,
        _BETA,
        NUM_TRAIN_TIMESTEPS,
    )

    def setup(self, device: Any = None) -> None:
        self.alpha, self.beta = float(self.config["alpha"]), float(self.config["beta"])
        #: model layer → (S_c, S_s, K); (None, None, 0) where only one LoRA has the layer
        self._scores: dict[str, tuple[float | None, float | None, int]] = {}
        for name, layer in self.layers.items():
            if layer.shared:
                self._scores[name] = layer_scores(layer.modules["content"], layer.modules["style"],
                                                  self.weights, device)
            else:
                self._scores[name] = (None, None, 0)
        shared = [v for v in self._scores.values() if v[0] is not None]
        gamma = self.config["gamma"]
        if gamma == "auto":
            num = sum(v[0] for v in shared)  # type: ignore[misc]
            den = sum(v[1] for v in shared)  # type: ignore[misc]
            self.gamma = float(num / den) if den > 0 else 1.0
        else:
            self.gamma = float(gamma)

    # ---- the decision
    def choice(self, name: str, timestep: float, num_train_timesteps: float | None = None) -> Concept:
        """The concept layer ``name`` (a path in the model) applies at ``timestep``."""
        s_c, s_s, _ = self._scores[name]
        if s_c is None:
            return "content" if "content" in self.layers[name].factors else "style"
        T = self.T if num_train_timesteps is None else float(num_train_timesteps)
        return choose(s_c, s_s, timestep, T, self.gamma, self.alpha, self.beta)  # type: ignore[arg-type]

    def step_record(self, t: float) -> StepRecord:
        return StepRecord(t, denoising_progress(t, self.T), style_scale(t, self.T, self.alpha, self.beta),
                          {name: self.choice(name, t) for name in self.layers})

    def layer_extra(self, layer: Layer, record: StepRecord, x: torch.Tensor) -> torch.Tensor:
        return lora_output(layer, record.choices[layer.name], x)

    # ---- reports
    def scores(self) -> dict[str, dict[str, Any]]:
        """Per model layer: ``S_c``, ``S_s``, ``K`` (``None`` where only one LoRA has the layer)."""
        out = {}
        for n, ly in self.layers.items():
            s_c, s_s, k = self._scores[n]
            out[n] = {"adapter_name": ly.adapter_name, "score_content": s_c, "score_style": s_s, "k": k,
                      "only": None if s_c is not None else next(iter(ly.factors))}
        return out

    def report(self) -> dict[str, Any]:
        """JSON-ready: the settings, each layer's scores and how often it chose content, and per step the
        counts of layers on each concept."""
        per_layer = self.scores()
        for name, info in per_layer.items():
            info["content_steps"] = sum(1 for r in self.records if r.choices.get(name) == "content")
            info["style_steps"] = sum(1 for r in self.records if r.choices.get(name) == "style")
        return {
            "method": "k-lora", "gamma": self.gamma, "alpha": self.alpha, "beta": self.beta,
            "weights": list(self.weights), "num_train_timesteps": self.T, "skipped_modules": list(self.skipped),
            "steps": [{"timestep": r.timestep, "progress": r.progress, "style_scale": r.style_scale, **r.counts}
                      for r in self.records],
            "layers": per_layer,
        }
