"""LoRAs wrapped around a UNet's layers, with optional trainable masks.

:func:`attach_loras` replaces every LoRA'd ``nn.Linear``/``nn.Conv2d`` of the UNet, in place, with a
:class:`MaskedLoraLayer` computing ``W0 x + Σ_i strength_i · scale_i · g_i(x)`` where ``g_i`` is input
``i``'s LoRA with an optional trainable mask (``rank``: ``B diag(m) A``; ``out``: ``diag(m) B A``;
``in``: ``B A diag(m)``, docs/algorithms.md §2).  Per-input strengths, a switch for the masks and per-group
scales make one wrapped UNet act as content-only, style-only or merged without copying it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MergeError, UsageError
from ..patterns import matches

UNET_PREFIX = "unet."


class LoraSlot(nn.Module):
    """One input's LoRA on one layer: fp32 factors (buffers), its scale, an optional trainable mask."""

    def __init__(
        self,
        up: torch.Tensor,
        down: torch.Tensor,
        scale: float,
        mask_kind: str | None,
        mask_init: torch.Tensor | None,
    ):
        super().__init__()
        self.register_buffer("up", up.float(), persistent=False)  # d_out × r (flattened)
        self.register_buffer("down", down.float(), persistent=False)  # r × d_in (flattened)
        self.scale = float(scale)
        self.strength = 1.0
        self.group_scale = 1.0
        self.mask_kind = mask_kind
        if mask_kind is None:
            self.mask = None
        else:
            size = {"rank": down.shape[0], "out": up.shape[0], "in": down.shape[1]}[mask_kind]
            init = torch.ones(size) if mask_init is None else mask_init.detach().float().reshape(-1)
            if init.numel() != size:
                raise ValueError(f"mask init has {init.numel()} values, the {mask_kind} mask needs {size}")
            self.mask = nn.Parameter(init.clone().to(self.up.device))

    def factors(self, use_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B', A')`` with the mask folded in (docs/algorithms.md §2), unscaled."""
        b, a = self.up, self.down
        m = self.mask if use_mask else None
        if m is None:
            return b, a
        if self.mask_kind == "rank":
            return b, m[:, None] * a
        if self.mask_kind == "out":
            return m[:, None] * b, a
        return b, a * m[None, :]


class MaskedLoraLayer(nn.Module):
    """``W0 x + Σ_i strength_i · group_scale_i · scale_i · B'_i A'_i x`` around a frozen Linear/Conv2d."""

    def __init__(self, base: nn.Module, name: str):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise MergeError(
                f"layer {name} is a {type(base).__name__}; only Linear and Conv2d can be wrapped"
            )
        self.base = base
        self.name = name
        self.slots = nn.ModuleList()
        self.use_masks = True

    def add_slot(self, slot: LoraSlot) -> None:
        self.slots.append(slot)

    def lora_output(self, x: torch.Tensor, index: int, use_mask: bool | None = None) -> torch.Tensor:
        """``scale_i · B'_i A'_i x`` for input ``index`` (no strength applied)."""
        slot = self.slots[index]
        b, a = slot.factors(self.use_masks if use_mask is None else use_mask)
        b, a = b.to(x.dtype), a.to(x.dtype)
        if isinstance(self.base, nn.Linear):
            return F.linear(F.linear(x, a), b) * slot.scale
        w = self.base.weight
        a4 = a.reshape(a.shape[0], *w.shape[1:])
        h = F.conv2d(
            x,
            a4,
            stride=self.base.stride,
            padding=self.base.padding,
            dilation=self.base.dilation,
            groups=self.base.groups,
        )
        return F.conv2d(h, b.reshape(b.shape[0], b.shape[1], 1, 1)) * slot.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for i, slot in enumerate(self.slots):
            s = slot.strength * slot.group_scale
            if s != 0:
                y = y + s * self.lora_output(x, i)
        return y

    def merged_delta(self) -> torch.Tensor:
        """Dense fp32 ``Σ_i strength_i · scale_i · B'_i A'_i`` (flattened), for tests and reports."""
        out = None
        for slot in self.slots:
            b, a = slot.factors(self.use_masks)
            d = (b * (slot.scale * slot.strength * slot.group_scale)) @ a
            out = d if out is None else out + d
        return out


@dataclass
class LoraSet:
    """The wrapped layers of one UNet (canonical module name → layer) and switches over them."""

    unet: nn.Module
    layers: dict[str, MaskedLoraLayer]
    num_inputs: int
    skipped: list[str] = field(default_factory=list)  # adapter modules outside the UNet (text encoders)
    _originals: dict[str, nn.Module] = field(default_factory=dict)

    # ---- masks ----
    def mask_parameters(self) -> list[nn.Parameter]:
        return [s.mask for layer in self.layers.values() for s in layer.slots if s.mask is not None]

    def named_masks(self) -> Iterator[tuple[str, int, nn.Parameter]]:
        for name, layer in self.layers.items():
            for i, s in enumerate(layer.slots):
                if s.mask is not None:
                    yield name, i, s.mask

    def masks(self) -> dict[str, list[torch.Tensor | None]]:
        """Detached fp32 CPU copies: layer name → one mask (or None) per input."""
        return {
            name: [None if s.mask is None else s.mask.detach().float().cpu().clone() for s in layer.slots]
            for name, layer in self.layers.items()
        }

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.mask_parameters())

    # ---- switches ----
    def set_strengths(self, strengths: Sequence[float]) -> None:
        if len(strengths) != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} strengths, got {len(strengths)}")
        for layer in self.layers.values():
            for s, v in zip(layer.slots, strengths):
                s.strength = float(v)

    def set_use_masks(self, flag: bool) -> None:
        for layer in self.layers.values():
            layer.use_masks = bool(flag)

    @contextlib.contextmanager
    def configured(self, strengths: Sequence[float] | None = None, use_masks: bool | None = None):
        """Temporarily set strengths and/or the mask switch, e.g. ``configured((1, 0), use_masks=False)``
        is the content LoRA alone, unmasked."""
        old_s = [s.strength for s in next(iter(self.layers.values())).slots] if self.layers else []
        old_m = next(iter(self.layers.values())).use_masks if self.layers else True
        try:
            if strengths is not None:
                self.set_strengths(strengths)
            if use_masks is not None:
                self.set_use_masks(use_masks)
            yield self
        finally:
            if self.layers:
                self.set_strengths(old_s)
                self.set_use_masks(old_m)

    def only(self, index: int, use_masks: bool = False):
        """Context: input ``index`` alone at strength 1 (unmasked by default)."""
        return self.configured([1.0 if i == index else 0.0 for i in range(self.num_inputs)], use_masks)

    def select(self, pattern: str | Callable[[str], bool] | Iterable[str]) -> list[str]:
        """Names of wrapped layers matched by a pattern (see :mod:`lora_merge.patterns`), a predicate or
        an explicit collection of names."""
        if callable(pattern):
            return [n for n in self.layers if pattern(n)]
        if isinstance(pattern, str):
            return [n for n in self.layers if matches(pattern, n)]
        wanted = set(pattern)
        return [n for n in self.layers if n in wanted]

    def set_group_scale(self, pattern, factor: float, inputs: Sequence[int] | None = None) -> list[str]:
        """Multiply the matched layers' LoRA contribution (for ``inputs``, default all) by ``factor``."""
        names = self.select(pattern)
        idx = range(self.num_inputs) if inputs is None else inputs
        for n in names:
            for i in idx:
                self.layers[n].slots[i].group_scale = float(factor)
        return names

    def reset_group_scales(self) -> None:
        for layer in self.layers.values():
            for s in layer.slots:
                s.group_scale = 1.0

    @contextlib.contextmanager
    def scaled(self, pattern, factor: float, inputs: Sequence[int] | None = None):
        """Context: the matched layers' LoRA contribution scaled by ``factor`` (ablations, priors)."""
        names = self.select(pattern)
        idx = list(range(self.num_inputs) if inputs is None else inputs)
        saved = {(n, i): self.layers[n].slots[i].group_scale for n in names for i in idx}
        try:
            self.set_group_scale(names, factor, idx)
            yield names
        finally:
            for (n, i), v in saved.items():
                self.layers[n].slots[i].group_scale = v

    def detach(self) -> None:
        """Put the original layers back into the UNet."""
        for name, orig in self._originals.items():
            _set_submodule(self.unet, name, orig)
        self._originals.clear()
        self.layers.clear()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def unet_module_name(canonical: str, prefix: str = UNET_PREFIX) -> str | None:
    """The UNet submodule path of a canonical adapter module name, or None when it is not a UNet module."""
    if prefix and canonical.startswith(prefix):
        return canonical[len(prefix) :]
    return None


def attach_loras(
    unet: nn.Module,
    adapters: Sequence[Any],
    *,
    weights: Sequence[float] | Callable[[str], Sequence[float]] | None = None,
    mask_kinds: Sequence[str | None] | str | None = None,
    mask_init: Callable[[str, int, int, tuple[int, ...]], torch.Tensor | None] | None = None,
    prefix: str = UNET_PREFIX,
    layer_filter: Callable[[str], bool] | None = None,
) -> LoraSet:
    """Wrap every UNet layer that any adapter touches.

    ``adapters`` are :class:`~lora_merge.adapter.Adapter` objects; ``weights`` multiply each LoRA's own
    ``alpha/r`` (default 1; a callable gives per-layer weights from the canonical name); ``mask_kinds``
    is one kind per input (or one for all; None = no mask);
    ``mask_init(name, input_index, size, ranks)`` may return the initial mask (default ones; ``ranks``
    are all inputs' ranks at that layer).  Modules outside
    the UNet (text encoders) are listed in ``LoraSet.skipped``; a UNet module the base model lacks, or
    whose shape differs, is a :class:`~lora_merge.errors.MergeError` (wrong base model).
    """
    n = len(adapters)
    if weights is None:
        weights = [1.0] * n
    weight_of = weights if callable(weights) else (lambda _name, _w=[float(w) for w in weights]: _w)
    if not callable(weights) and len(weights) != n:
        raise UsageError(f"{len(weights)} weights for {n} adapters")
    kinds = list(mask_kinds) if isinstance(mask_kinds, (list, tuple)) else [mask_kinds] * n
    names: list[str] = []
    skipped: list[str] = []
    for ad in adapters:
        for cname in ad.modules:
            if cname in names or cname in skipped:
                continue
            if unet_module_name(cname, prefix) is None:
                skipped.append(cname)
            elif layer_filter is None or layer_filter(cname):
                names.append(cname)
    device = next(unet.parameters()).device
    layers: dict[str, MaskedLoraLayer] = {}
    originals: dict[str, nn.Module] = {}
    lora_set = LoraSet(unet, layers, n, skipped, originals)
    try:
        for cname in names:
            sub = unet_module_name(cname, prefix)
            try:
                base = unet.get_submodule(sub)
            except AttributeError:
                raise MergeError(
                    f"the base model has no layer {sub!r} (adapter module {cname}); wrong base model?"
                )
            if isinstance(base, MaskedLoraLayer):
                raise MergeError(f"layer {sub!r} is already wrapped; detach the previous LoraSet first")
            layer = MaskedLoraLayer(base, cname)
            w_shape = tuple(base.weight.shape)
            layer_w = [float(x) for x in weight_of(cname)]
            d_out, d_in = w_shape[0], int(torch.tensor(w_shape[1:]).prod())
            factors = []
            for i, ad in enumerate(adapters):
                mod = ad.modules.get(cname)
                if mod is None:  # absent from this input: a zero update with a zero-size rank
                    up, down, scale = torch.zeros(d_out, 0), torch.zeros(0, d_in), 0.0
                else:
                    up, down = mod.factors(torch.float32, device)
                    scale = mod.scale * layer_w[i]
                if up.shape[0] != d_out or down.shape[1] != d_in:
                    raise MergeError(
                        f"adapter module {cname} has shape {tuple(up.shape[:1]) + tuple(down.shape[1:])}, "
                        f"the base layer {tuple(w_shape)}; wrong base model?",
                        getattr(ad, "source", None),
                    )
                factors.append((up, down, scale))
            ranks = tuple(int(f[1].shape[0]) for f in factors)
            for i, (up, down, scale) in enumerate(factors):
                kind = kinds[i]
                init = None
                if kind is not None and mask_init is not None:
                    size = {"rank": down.shape[0], "out": d_out, "in": d_in}[kind]
                    init = mask_init(cname, i, size, ranks)
                layer.add_slot(LoraSlot(up.to(device), down.to(device), scale, kind, init))
            layer.to(device)
            originals[sub] = base
            _set_submodule(unet, sub, layer)
            layers[cname] = layer
    except Exception:
        lora_set.detach()
        raise
    return lora_set
