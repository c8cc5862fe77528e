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
authors' code counts layer calls and assumes 50 steps; this module does not.)

Nothing here can be saved as one LoRA file: the choice changes with the timestep.  See
docs/strategies.md, "Sampling-time merging: K-LoRA".
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter, LoraModule
from .errors import UsageError

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "DEFAULT_NUM_TRAIN_TIMESTEPS",
    "SAMPLING_TIME_MERGERS",
    "KLoRA",
    "StepRecord",
    "choose",
    "denoising_progress",
    "layer_scores",
    "style_scale",
    "topk_abs_sum",
]

Concept = Literal["content", "style"]

#: σ(t) = α · (1 − t/T) + β: the paper's scaling factor, with its 1.5 and 0.5
DEFAULT_ALPHA = 1.5
DEFAULT_BETA = 0.5
#: T when neither a scheduler nor ``num_train_timesteps`` is given (every SD/SDXL/Flux scheduler's default)
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
#: name prefixes of the denoiser in adapter module names (stripped to find the layer in the model)
DENOISER_PREFIXES = ("unet.", "transformer.")
#: prefixes of modules that are not in the denoiser (skipped: K-LoRA hooks the denoiser only)
OTHER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "te.", "te1.", "te2.")

#: what ``lora-merge strategies`` lists under "sampling-time mergers" (no torch needed to print it)
SAMPLING_TIME_MERGERS: list[dict[str, Any]] = [
    {
        "name": "k-lora",
        "description": "K-LoRA: per layer and per denoising step, apply the content OR the style LoRA, "
                       "whichever has the larger sum of its top-K |ΔW| entries (style scaled by γ and the "
                       "timestep); content early, style late",
        "reference": "Ouyang, Li, Hou: K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style "
                     "LoRAs, CVPR 2025 (arXiv:2502.18461)",
        "static_file": False,
        "api": "from lora_merge.klora import KLoRA; KLoRA.attach(pipe.unet, content, style) ... .detach()",
        "params": [
            {"name": "gamma", "type": "float | 'auto'", "default": "auto",
             "help": "γ: style score multiplier; auto = Σ S_c / Σ S_s over the shared layers"},
            {"name": "weights", "type": "(float, float)", "default": [1.0, 1.0],
             "help": "strengths w_c, w_s of the two LoRAs (ΔW and the scores both scale)"},
            {"name": "alpha", "type": "float", "default": DEFAULT_ALPHA,
             "help": "σ(t) = alpha · (1 − t/T) + beta"},
            {"name": "beta", "type": "float", "default": DEFAULT_BETA,
             "help": "σ(t) = alpha · (1 − t/T) + beta"},
            {"name": "num_train_timesteps", "type": "float", "default": None,
             "help": "T; default scheduler.config.num_train_timesteps, else 1000 (Flux pipelines call "
                     "the transformer with t/1000: give 1)"},
        ],
    }
]


# ------------------------------------------------------------------------------------------ the math
def topk_abs_sum(delta: torch.Tensor, k: int) -> float:
    """Σ of the ``k`` largest ``|ΔW|`` entries (``ΔW`` flattened; ``k`` clipped to ``[1, numel]``)."""
    flat = delta.detach().reshape(-1).abs().float()
    if flat.numel() == 0:
        return 0.0
    k = max(1, min(int(k), flat.numel()))
    return float(torch.topk(flat, k, sorted=False).values.sum())


def denoising_progress(timestep: float, num_train_timesteps: float) -> float:
    """``p = 1 − t/T`` clipped to ``[0, 1]``: 0 at pure noise (``t = T``), 1 at the clean end (``t = 0``)."""
    p = 1.0 - float(timestep) / float(num_train_timesteps)
    return min(1.0, max(0.0, p))


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


# ------------------------------------------------------------------------------------------ the hooks
@dataclass
class StepRecord:
    """One call of the hooked model: its timestep and the concept each hooked layer applied."""

    timestep: float
    progress: float
    style_scale: float
    choices: dict[str, Concept]

    @property
    def counts(self) -> dict[str, int]:
        vals = list(self.choices.values())
        return {"content": vals.count("content"), "style": vals.count("style")}


@dataclass
class _Layer:
    name: str  # path in the model (prefix stripped)
    adapter_name: str  # path in the adapters
    score_content: float | None
    score_style: float | None
    k: int
    #: concept → (B, A) as stored (2-D, unscaled) and the coefficient w · scale of B
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    coef: dict[str, float] = field(default_factory=dict)
    #: concept → the factors as the bound module applies them (its device and dtype, conv-shaped)
    bound: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kind: str = "linear"
    conv: dict[str, Any] = field(default_factory=dict)


def lora_output(layer: _Layer, concept: str, x: torch.Tensor) -> torch.Tensor:
    """``ΔW·x`` of one concept's bound factors, as ``B(Ax)`` (a linear or a conv layer)."""
    b, a = layer.bound[concept]
    if layer.kind == "linear":
        return F.linear(F.linear(x.to(a.dtype), a), b)
    return F.conv2d(F.conv2d(x.to(a.dtype), a, None, **layer.conv), b)


class _AttachMethod:
    """``KLoRA.attach(model, content, style, **options)`` builds and attaches; ``instance.attach(model)``
    attaches an instance built earlier (what ``toyworld.sampling.sample(merger=...)`` calls)."""

    def __get__(self, obj, cls):
        if obj is None:
            def build_and_attach(model: nn.Module, content: Adapter, style: Adapter, *,
                                 scheduler: Any = None, **options: Any) -> KLoRA:
                return cls(content, style, **options)._attach(model, scheduler=scheduler)

            return build_and_attach
        return functools.partial(cls._attach, obj)


class KLoRA:
    """K-LoRA over a content and a style :class:`~lora_merge.adapter.Adapter`.

    ``KLoRA.attach(unet, content, style, gamma="auto", weights=(1, 1))`` returns an attached instance;
    ``KLoRA(content, style, ...)`` builds one unattached, and ``.attach(unet, scheduler=...)`` binds it
    later.  Forward hooks add the chosen ``ΔW·x`` (from the factors: ``B(Ax)``) to each targeted
    ``nn.Linear``/``nn.Conv2d``; the base weights are never touched.  A forward pre-hook on the top
    module reads the timestep of each call (``timestep=`` or the 2nd positional argument; a number or a
    tensor whose entries are equal).  ``detach()`` removes every hook.  ``records`` holds one
    :class:`StepRecord` per model call since the last ``attach``.  Also a context manager
    (``with KLoRA.attach(...) as k: ...`` detaches at the end).
    """

    attach = _AttachMethod()

    def __init__(self, content: Adapter, style: Adapter, *, gamma: float | str = "auto",
                 weights: Sequence[float] = (1.0, 1.0), alpha: float = DEFAULT_ALPHA,
                 beta: float = DEFAULT_BETA, num_train_timesteps: float | None = None, device=None):
        for what, ad in (("content", content), ("style", style)):
            if not isinstance(ad, Adapter):
                raise UsageError(f"K-LoRA: the {what} adapter must be an Adapter "
                                 f"(load a file with lora_merge.load(path)), not {type(ad).__name__}")
        if len(weights) != 2:
            raise UsageError(f"K-LoRA: weights takes two values (content, style), got {len(weights)}")
        self.content, self.style = content, style
        self.weights = (float(weights[0]), float(weights[1]))
        self.alpha, self.beta = float(alpha), float(beta)
        self.num_train_timesteps = None if num_train_timesteps is None else float(num_train_timesteps)
        self.skipped: list[str] = []
        self.layers: dict[str, _Layer] = {}
        for adapter_name in sorted(set(content.modules) | set(style.modules)):
            target = self._target_name(adapter_name)
            if target is None:
                self.skipped.append(adapter_name)
                continue
            mc, ms = content.modules.get(adapter_name), style.modules.get(adapter_name)
            if mc is not None and ms is not None:
                if tuple(mc.weight_shape) != tuple(ms.weight_shape):
                    raise UsageError(f"K-LoRA: module {adapter_name!r} has shape {mc.weight_shape} in the "
                                     f"content LoRA and {ms.weight_shape} in the style LoRA")
                s_c, s_s, k = layer_scores(mc, ms, self.weights, device)
            else:
                s_c = s_s = None
                k = 0
            layer = _Layer(target, adapter_name, s_c, s_s, k)
            for concept, mod, w in (("content", mc, self.weights[0]), ("style", ms, self.weights[1])):
                if mod is not None:
                    b, a = mod.factors(mod.dtype)  # as stored; scaled when bound, in the model's dtype
                    layer.factors[concept] = (b, a)
                    layer.coef[concept] = mod.scale * w
            self.layers[target] = layer
        if not self.layers:
            raise UsageError("K-LoRA: the two adapters have no denoiser (unet./transformer.) module")
        shared = [ly for ly in self.layers.values() if ly.score_content is not None]
        if gamma == "auto":
            num = sum(ly.score_content for ly in shared)  # type: ignore[misc]
            den = sum(ly.score_style for ly in shared)  # type: ignore[misc]
            self.gamma = float(num / den) if den > 0 else 1.0
        elif isinstance(gamma, str):
            raise UsageError(f"K-LoRA: gamma is a number or 'auto', not {gamma!r}")
        else:
            self.gamma = float(gamma)
        self.records: list[StepRecord] = []
        self._model: nn.Module | None = None
        self._handles: list[Any] = []
        self._current: StepRecord | None = None
        self._T = float(DEFAULT_NUM_TRAIN_TIMESTEPS)

    # ---- names
    @staticmethod
    def _target_name(adapter_name: str) -> str | None:
        for p in DENOISER_PREFIXES:
            if adapter_name.startswith(p):
                return adapter_name[len(p):]
        if adapter_name.startswith(OTHER_PREFIXES):
            return None
        return adapter_name

    # ---- the decision
    def choice(self, name: str, timestep: float, num_train_timesteps: float | None = None) -> Concept:
        """The concept layer ``name`` (a path in the model) applies at ``timestep``."""
        layer = self.layers[name]
        if layer.score_content is None:
            return "content" if "content" in layer.factors else "style"
        T = self._T if num_train_timesteps is None else float(num_train_timesteps)
        return choose(layer.score_content, layer.score_style, timestep, T, self.gamma,  # type: ignore[arg-type]
                      self.alpha, self.beta)

    # ---- attach / detach
    def _attach(self, model: nn.Module, *, scheduler: Any = None,
                num_train_timesteps: float | None = None) -> KLoRA:
        if self._model is not None:
            raise UsageError("K-LoRA: already attached; call detach() first")
        if num_train_timesteps is not None:
            T = float(num_train_timesteps)
        elif scheduler is not None:
            T = float(scheduler.config.num_train_timesteps)
        elif self.num_train_timesteps is not None:
            T = self.num_train_timesteps
        else:
            T = float(DEFAULT_NUM_TRAIN_TIMESTEPS)
        if not T > 0:
            raise UsageError(f"K-LoRA: num_train_timesteps must be positive, got {T}")
        modules = dict(model.named_modules())
        missing = [ly.adapter_name for ly in self.layers.values() if ly.name not in modules]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UsageError(f"K-LoRA: the model has no module for {', '.join(map(repr, missing[:3]))}{more} "
                             "(is the LoRA for this model?)")
        bound: list[tuple[_Layer, nn.Module]] = []
        for layer in self.layers.values():
            target = modules[layer.name]
            self._bind(layer, target)
            bound.append((layer, target))
        self._T = T
        self.records = []
        self._model = model
        try:
            self._handles.append(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._post_hook, always_call=True))
            for layer, target in bound:
                self._handles.append(target.register_forward_hook(self._layer_hook(layer)))
        except BaseException:
            self.detach()
            raise
        return self

    def _bind(self, layer: _Layer, target: nn.Module) -> None:
        w = getattr(target, "weight", None)
        if isinstance(target, nn.Linear):
            layer.kind = "linear"
        elif isinstance(target, nn.Conv2d):
            if target.groups != 1 or target.padding_mode != "zeros":
                raise UsageError(f"K-LoRA: {layer.adapter_name!r} is a grouped or non-zero-padded conv; "
                                 "not supported")
            layer.kind = "conv"
            layer.conv = {"stride": target.stride, "padding": target.padding, "dilation": target.dilation}
        else:
            raise UsageError(f"K-LoRA: {layer.adapter_name!r} is a {type(target).__name__}, not an nn.Linear "
                             "or nn.Conv2d")
        shape = tuple(w.shape)  # type: ignore[union-attr]
        layer.bound = {}
        for concept, (b, a) in layer.factors.items():
            if b.shape[0] * a.shape[1] != w.numel():  # type: ignore[union-attr]
                raise UsageError(f"K-LoRA: module {layer.adapter_name!r} has a {b.shape[0]}×{a.shape[1]} "
                                 f"update in the {concept} LoRA, the model's weight is {shape}")
            work = torch.promote_types(w.dtype, torch.float32)  # type: ignore[union-attr]
            b = (b.to(w.device, work) * layer.coef[concept]).to(w.dtype)  # type: ignore[union-attr]
            a = a.to(w.device, w.dtype)  # type: ignore[union-attr]
            if layer.kind == "conv":
                r = a.shape[0]
                a = a.reshape(r, *shape[1:])
                b = b.reshape(shape[0], r, 1, 1)
            layer.bound[concept] = (b, a)

    def detach(self) -> None:
        """Remove every hook (idempotent); the model computes exactly what it did before ``attach``."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self.layers.values():
            layer.bound = {}
        self._model = None
        self._current = None

    @property
    def attached(self) -> bool:
        return self._model is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---- hooks
    @staticmethod
    def read_timestep(args: tuple, kwargs: Mapping[str, Any]) -> float:
        """The timestep of one model call: ``timestep=`` or the 2nd positional argument."""
        if "timestep" in kwargs:
            t = kwargs["timestep"]
        elif len(args) > 1:
            t = args[1]
        else:
            raise UsageError("K-LoRA: the model was called without a timestep (neither timestep= nor a "
                             "2nd positional argument)")
        if isinstance(t, torch.Tensor):
            flat = t.detach().reshape(-1)
            if flat.numel() == 0:
                raise UsageError("K-LoRA: the model was called with an empty timestep tensor")
            if flat.numel() > 1 and not bool((flat == flat[0]).all()):
                raise UsageError("K-LoRA: the batch holds different timesteps; K-LoRA chooses one LoRA per "
                                 "layer and step, so call the model with one timestep")
            return float(flat[0])
        return float(t)

    def _pre_hook(self, module, args, kwargs):
        rec = self._record(self.read_timestep(args, kwargs))
        self.records.append(rec)
        self._current = rec

    def _record(self, t: float) -> StepRecord:
        """What every hooked layer does in the model call at timestep ``t``."""
        return StepRecord(t, denoising_progress(t, self._T), style_scale(t, self._T, self.alpha, self.beta),
                          {name: self.choice(name, t) for name in self.layers})

    def _extra(self, layer: _Layer, rec: StepRecord, x: torch.Tensor) -> torch.Tensor:
        """What the hooked ``layer`` adds to its output for input ``x`` in the call ``rec``."""
        return lora_output(layer, rec.choices[layer.name], x)

    def _post_hook(self, module, args, output):
        self._current = None

    def _layer_hook(self, layer: _Layer):
        def hook(module, args, output):
            rec = self._current
            if rec is None:
                raise UsageError(f"{type(self).__name__}: layer {layer.name!r} ran outside a call of the model "
                                 "it is attached to (no timestep)")
            return output + self._extra(layer, rec, args[0]).to(output.dtype)

        return hook

    # ---- reports
    def scores(self) -> dict[str, dict[str, Any]]:
        """Per model layer: ``S_c``, ``S_s``, ``K`` (``None`` where only one LoRA has the layer)."""
        return {n: {"adapter_name": ly.adapter_name, "score_content": ly.score_content,
                    "score_style": ly.score_style, "k": ly.k, "only": None if ly.score_content is not None
                    else next(iter(ly.factors))} for n, ly in self.layers.items()}

    def report(self) -> dict[str, Any]:
        """JSON-ready: the settings, each layer's scores and how often it chose content, and per step the
        counts of layers on each concept."""
        per_layer = self.scores()
        for name, info in per_layer.items():
            info["content_steps"] = sum(1 for r in self.records if r.choices.get(name) == "content")
            info["style_steps"] = sum(1 for r in self.records if r.choices.get(name) == "style")
        return {
            "method": "k-lora", "gamma": self.gamma, "alpha": self.alpha, "beta": self.beta,
            "weights": list(self.weights), "num_train_timesteps": self._T, "skipped_modules": list(self.skipped),
            "steps": [{"timestep": r.timestep, "progress": r.progress, "style_scale": r.style_scale, **r.counts}
                      for r in self.records],
            "layers": per_layer,
        }
