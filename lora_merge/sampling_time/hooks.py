"""The hook layer every sampling-time merger shares: forward hooks on any ``nn.Module`` denoiser (a
diffusers UNet or transformer, the toy world's UNet) that add, at each LoRA'd layer and each model call, an
update the merger picks from the call's real timestep.  Adapter tensors and torch only; no diffusers.

* :func:`collect_layers` lines up the content and the style adapter once: one :class:`Layer` per model
  sub-module (the adapter name with its ``unet.`` / ``transformer.`` prefix removed; text-encoder modules
  are skipped), holding each LoRA's stored factors and its coefficient ``w_i · alpha_i/r_i``.
* :class:`LayerHooks` attaches and detaches: :meth:`LayerHooks.attach_hooks` checks the model has every
  layer, binds the factors to each target's device, dtype and shape (:func:`bind`) and registers a
  forward pre-hook on the top module, which reads each call's timestep (:func:`read_timestep`) and asks
  the merger for that call's :class:`StepRecord` (``step_record(t)``), and one forward hook per targeted
  ``nn.Linear`` / ``nn.Conv2d``, which adds the merger's ``layer_extra(layer, record, x)`` to the layer's
  output.  ``detach()`` removes every hook; the base weights are never touched.
* :func:`lora_output` is one LoRA's ``ΔW·x`` at a bound layer, computed as ``B(Ax)``;
  :func:`denoising_progress` is ``p = 1 − t/T``, the fraction of the denoising done.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Adapter, LoraModule
from ..errors import UsageError

__all__ = [
    "CONCEPTS",
    "DEFAULT_NUM_TRAIN_TIMESTEPS",
    "DENOISER_PREFIXES",
    "OTHER_PREFIXES",
    "Layer",
    "LayerHooks",
    "StepRecord",
    "bind",
    "collect_layers",
    "denoising_progress",
    "lora_output",
    "model_path",
    "read_timestep",
]

#: the two inputs of a sampling-time merge, in order
CONCEPTS = ("content", "style")
#: T when neither a scheduler nor ``num_train_timesteps`` is given (every SD/SDXL/Flux scheduler's default)
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
#: name prefixes of the denoiser in adapter module names (stripped to find the layer in the model)
DENOISER_PREFIXES = ("unet.", "transformer.")
#: prefixes of modules that are not in the denoiser (skipped: the mergers hook the denoiser only)
OTHER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "te.", "te1.", "te2.")


def denoising_progress(timestep: float, num_train_timesteps: float) -> float:
    """``p = 1 − t/T`` clipped to ``[0, 1]``: 0 at pure noise (``t = T``), 1 at the clean end (``t = 0``)."""
    p = 1.0 - float(timestep) / float(num_train_timesteps)
    return min(1.0, max(0.0, p))


@dataclass
class StepRecord:
    """One call of the hooked model: its timestep, the progress ``p``, the merger's schedule value
    (K-LoRA's σ(t); 0 where a merger has none) and what each hooked layer applied (``choices``: layer →
    a concept, or a phase such as ``"early"``)."""

    timestep: float
    progress: float
    style_scale: float
    choices: dict[str, str]

    @property
    def counts(self) -> dict[str, int]:
        vals = list(self.choices.values())
        return {"content": vals.count("content"), "style": vals.count("style")}


@dataclass
class Layer:
    """One hooked model layer and the LoRAs that have it."""

    name: str  # path in the model (prefix stripped)
    adapter_name: str  # path in the adapters
    #: concept → the adapter's module (one or both concepts)
    modules: dict[str, LoraModule] = field(default_factory=dict)
    #: concept → (B, A) as stored (2-D, unscaled) and the coefficient w · scale of B
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    coef: dict[str, float] = field(default_factory=dict)
    #: concept → the factors as the bound module applies them (its device and dtype, conv-shaped)
    bound: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    kind: str = "linear"
    conv: dict[str, Any] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        """Both LoRAs have this layer."""
        return len(self.modules) == 2


def lora_output(layer: Layer, concept: str, x: torch.Tensor) -> torch.Tensor:
    """``ΔW·x`` of one concept's bound factors, as ``B(Ax)`` (a linear or a conv layer)."""
    b, a = layer.bound[concept]
    if layer.kind == "linear":
        return F.linear(F.linear(x.to(a.dtype), a), b)
    return F.conv2d(F.conv2d(x.to(a.dtype), a, None, **layer.conv), b)


def model_path(adapter_name: str) -> str | None:
    """The model sub-module an adapter module targets (``unet.`` / ``transformer.`` removed), or None for
    a module outside the denoiser (a text encoder's)."""
    for p in DENOISER_PREFIXES:
        if adapter_name.startswith(p):
            return adapter_name[len(p):]
    if adapter_name.startswith(OTHER_PREFIXES):
        return None
    return adapter_name


def collect_layers(label: str, content: Adapter, style: Adapter, weights: Sequence[float]
                   ) -> tuple[dict[str, Layer], list[str]]:
    """``(model path → Layer, skipped adapter module names)`` of two adapters, in adapter-name order.
    ``label`` starts the error messages (the merger's name)."""
    for what, ad in zip(CONCEPTS, (content, style)):
        if not isinstance(ad, Adapter):
            raise UsageError(f"{label}: the {what} adapter must be an Adapter "
                             f"(load a file with lora_merge.load(path)), not {type(ad).__name__}")
    skipped: list[str] = []
    layers: dict[str, Layer] = {}
    for adapter_name in sorted(set(content.modules) | set(style.modules)):
        target = model_path(adapter_name)
        if target is None:
            skipped.append(adapter_name)
            continue
        mc, ms = content.modules.get(adapter_name), style.modules.get(adapter_name)
        if mc is not None and ms is not None and tuple(mc.weight_shape) != tuple(ms.weight_shape):
            raise UsageError(f"{label}: module {adapter_name!r} has shape {mc.weight_shape} in the "
                             f"content LoRA and {ms.weight_shape} in the style LoRA")
        layer = Layer(target, adapter_name)
        for concept, mod, w in zip(CONCEPTS, (mc, ms), weights):
            if mod is not None:
                layer.modules[concept] = mod
                b, a = mod.factors(mod.dtype)  # as stored; scaled when bound, in the model's dtype
                layer.factors[concept] = (b, a)
                layer.coef[concept] = mod.scale * float(w)
        layers[target] = layer
    if not layers:
        raise UsageError(f"{label}: the two adapters have no denoiser (unet./transformer.) module")
    return layers, skipped


def bind(label: str, layer: Layer, target: nn.Module) -> None:
    """Fill ``layer.bound``: each concept's factors on ``target``'s device and dtype, ``B`` scaled by the
    coefficient, conv-shaped for an ``nn.Conv2d``."""
    w = getattr(target, "weight", None)
    if isinstance(target, nn.Linear):
        layer.kind = "linear"
    elif isinstance(target, nn.Conv2d):
        if target.groups != 1 or target.padding_mode != "zeros":
            raise UsageError(f"{label}: {layer.adapter_name!r} is a grouped or non-zero-padded conv; not supported")
        layer.kind = "conv"
        layer.conv = {"stride": target.stride, "padding": target.padding, "dilation": target.dilation}
    else:
        raise UsageError(f"{label}: {layer.adapter_name!r} is a {type(target).__name__}, not an nn.Linear "
                         "or nn.Conv2d")
    shape = tuple(w.shape)  # type: ignore[union-attr]
    layer.bound = {}
    for concept, (b, a) in layer.factors.items():
        if b.shape[0] * a.shape[1] != w.numel():  # type: ignore[union-attr]
            raise UsageError(f"{label}: module {layer.adapter_name!r} has a {b.shape[0]}×{a.shape[1]} "
                             f"update in the {concept} LoRA, the model's weight is {shape}")
        work = torch.promote_types(w.dtype, torch.float32)  # type: ignore[union-attr]
        b = (b.to(w.device, work) * layer.coef[concept]).to(w.dtype)  # type: ignore[union-attr]
        a = a.to(w.device, w.dtype)  # type: ignore[union-attr]
        if layer.kind == "conv":
            r = a.shape[0]
            a = a.reshape(r, *shape[1:])
            b = b.reshape(shape[0], r, 1, 1)
        layer.bound[concept] = (b, a)


def read_timestep(args: tuple, kwargs: Mapping[str, Any], label: str = "sampling-time merger") -> float:
    """The timestep of one model call: ``timestep=`` or the 2nd positional argument (a number, or a tensor
    whose entries are equal, as a classifier-free-guidance batch is)."""
    if "timestep" in kwargs:
        t = kwargs["timestep"]
    elif len(args) > 1:
        t = args[1]
    else:
        raise UsageError(f"{label}: the model was called without a timestep (neither timestep= nor a "
                         "2nd positional argument)")
    if isinstance(t, torch.Tensor):
        flat = t.detach().reshape(-1)
        if flat.numel() == 0:
            raise UsageError(f"{label}: the model was called with an empty timestep tensor")
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise UsageError(f"{label}: the batch holds different timesteps; the merger picks the LoRAs per "
                             "layer and step, so call the model with one timestep")
        return float(flat[0])
    return float(t)


class LayerHooks:
    """Attach / detach of a merger's :attr:`layers` on a model.  A subclass sets ``layers`` (from
    :func:`collect_layers`), ``label`` and ``num_train_timesteps`` (None: the scheduler's), calls
    :meth:`init_hooks`, and implements :meth:`step_record` and :meth:`layer_extra`.

    ``records`` holds one :class:`StepRecord` per model call since the last attach; ``T`` is the
    ``num_train_timesteps`` in effect.  Also a context manager (``with m.attach(...):`` detaches at the
    end)."""

    label: ClassVar[str] = "sampling-time merger"
    layers: dict[str, Layer]
    num_train_timesteps: float | None = None

    def init_hooks(self) -> None:
        self.records: list[StepRecord] = []
        self.T = float(DEFAULT_NUM_TRAIN_TIMESTEPS)
        self._model: nn.Module | None = None
        self._handles: list[Any] = []
        self._current: StepRecord | None = None

    # ---- what a merger decides
    def step_record(self, t: float) -> StepRecord:
        """What every hooked layer does in the model call at timestep ``t`` (``self.T`` is set)."""
        raise NotImplementedError

    def layer_extra(self, layer: Layer, record: StepRecord, x: torch.Tensor) -> torch.Tensor:
        """What the hooked ``layer`` adds to its output for input ``x`` in the call ``record`` (built from
        :func:`lora_output`; a 0-d zero adds nothing)."""
        raise NotImplementedError

    # ---- attach / detach
    def attach_hooks(self, model: nn.Module, *, scheduler: Any = None,
                     num_train_timesteps: float | None = None) -> LayerHooks:
        """Bind the layers to ``model`` and register the hooks.  ``T``: ``num_train_timesteps``, else
        ``scheduler.config.num_train_timesteps``, else the merger's setting, else 1000."""
        if self._model is not None:
            raise UsageError(f"{self.label}: already attached; call detach() first")
        if num_train_timesteps is not None:
            T = float(num_train_timesteps)
        elif scheduler is not None:
            T = float(scheduler.config.num_train_timesteps)
        elif self.num_train_timesteps is not None:
            T = float(self.num_train_timesteps)
        else:
            T = float(DEFAULT_NUM_TRAIN_TIMESTEPS)
        if not T > 0:
            raise UsageError(f"{self.label}: num_train_timesteps must be positive, got {T}")
        modules = dict(model.named_modules())
        missing = [ly.adapter_name for ly in self.layers.values() if ly.name not in modules]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UsageError(f"{self.label}: the model has no module for {', '.join(map(repr, missing[:3]))}"
                             f"{more} (is the LoRA for this model?)")
        bound: list[tuple[Layer, nn.Module]] = []
        for layer in self.layers.values():
            target = modules[layer.name]
            bind(self.label, layer, target)
            bound.append((layer, target))
        self.T = T
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

    def detach(self) -> None:
        """Remove every hook (idempotent); the model computes exactly what it did before the attach."""
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

    # ---- the hooks
    def _pre_hook(self, module, args, kwargs):
        rec = self.step_record(read_timestep(args, kwargs, self.label))
        self.records.append(rec)
        self._current = rec

    def _post_hook(self, module, args, output):
        self._current = None

    def _layer_hook(self, layer: Layer):
        def hook(module, args, output):
            rec = self._current
            if rec is None:
                raise UsageError(f"{type(self).__name__}: layer {layer.name!r} ran outside a call of the model "
                                 "it is attached to (no timestep)")
            return output + self.layer_extra(layer, rec, args[0]).to(output.dtype)

        return hook
