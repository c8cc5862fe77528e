"""Sampling the toy world with a LoRA folded into a copy of the UNet's weights.

``ΔW = scale · (alpha/r) · B · A`` is added to each targeted ``nn.Linear``/``nn.Conv2d`` of a copy of the
base UNet (the base itself is never modified).  ``lora_group_scales`` multiplies ΔW per module-name
pattern (the project's pattern syntax, :mod:`lora_merge.patterns`; several matching patterns multiply),
so one group of layers can be scaled down to see what it carries.

``sample(..., merger=m)`` samples with a *sampling-time* merger such as :class:`lora_merge.klora.KLoRA`:
an object with ``attach(unet, scheduler=...)`` and ``detach()``.  It is attached to the UNet (with the
adapter folded in, when one is given too) before the first step with the scheduler that drives the
loop, so it sees the real timesteps and ``scheduler.config.num_train_timesteps``, and detached
afterwards, also on an error.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import load
from ..adapter import Adapter
from ..errors import UsageError
from ..patterns import compile_pattern
from .model import ToyWorld, ddim_scheduler

DEFAULT_STEPS = 25
#: classifier-free guidance scale; 1 = plain conditional sampling (measured on the shipped base: guidance 1
#: draws the asked shape 20/20, 1.5 15/20, 2 9/20 — guidance pushes this small model's shapes to blobs)
DEFAULT_GUIDANCE = 1.0


def as_adapter(adapter: Adapter | str | os.PathLike) -> Adapter:
    if isinstance(adapter, Adapter):
        return adapter
    return load(adapter)


def _group_factor(name: str, group_scales: Mapping[str, float] | None) -> float:
    if not group_scales:
        return 1.0
    f = 1.0
    for pattern, s in group_scales.items():
        if compile_pattern(pattern).search(name):
            f *= float(s)
    return f


def apply_lora(unet: torch.nn.Module, adapter: Adapter | str | os.PathLike, scale: float = 1.0,
               lora_group_scales: Mapping[str, float] | None = None) -> torch.nn.Module:
    """A copy of ``unet`` with the adapter's ΔW folded into its weights (fp32 math)."""
    ad = as_adapter(adapter)
    out = copy.deepcopy(unet)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name, mod in ad.modules.items():
            if not name.startswith("unet."):
                raise UsageError(f"{ad.display_name}: module {name!r} is not a UNet layer; the toy world's "
                                 "LoRAs train the UNet only")
            target = modules.get(name[len("unet."):])
            if target is None or not hasattr(target, "weight"):
                raise UsageError(f"{ad.display_name}: module {name!r} does not exist in the toy-world UNet "
                                 "(is this a toy-world LoRA?)")
            w = target.weight
            if tuple(w.shape) != tuple(mod.weight_shape):
                raise UsageError(f"{ad.display_name}: module {name!r} has shape {mod.weight_shape}, "
                                 f"the toy-world UNet has {tuple(w.shape)}")
            f = scale * _group_factor(name, lora_group_scales)
            if f == 0.0:
                continue
            delta = mod.delta(torch.float32, flat=False) * f
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
    return out


def initial_noise(seeds: Sequence[int], size: int) -> torch.Tensor:
    """Per-image noise from its own seed: image i is the same whatever else is in the batch."""
    return torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(world: ToyWorld, prompts: Sequence[str] | str, seeds: Sequence[int],
           adapter: Adapter | str | os.PathLike | None = None, scale: float = 1.0, steps: int = DEFAULT_STEPS,
           lora_group_scales: Mapping[str, float] | None = None, guidance: float = DEFAULT_GUIDANCE,
           batch_size: int = 256, merger: Any = None) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in ``[-1, 1]``: DDIM (η = 0), classifier-free guidance when ``guidance != 1``.

    ``prompts`` is one prompt or one per seed.  Deterministic given the arguments.  ``merger``: a
    sampling-time merger (``attach(unet, scheduler=...)`` / ``detach()``, e.g. a ``KLoRA`` of two
    adapters), attached for the whole call; ``None`` samples exactly as before.
    """
    seeds = [int(s) for s in seeds]
    if isinstance(prompts, str):
        prompts = [prompts] * len(seeds)
    if len(prompts) != len(seeds):
        raise UsageError(f"sample: {len(prompts)} prompts for {len(seeds)} seeds")
    unet = world.unet if adapter is None else apply_lora(world.unet, adapter, scale, lora_group_scales)
    sched = ddim_scheduler(world.config.get("scheduler"))
    sched.set_timesteps(steps)
    if merger is None:
        return _denoise(world, unet, sched, list(prompts), seeds, guidance, batch_size)
    merger.attach(unet, scheduler=sched)
    try:
        return _denoise(world, unet, sched, list(prompts), seeds, guidance, batch_size)
    finally:
        merger.detach()


def _denoise(world: ToyWorld, unet: torch.nn.Module, sched: Any, prompts: list[str], seeds: list[int],
             guidance: float, batch_size: int) -> torch.Tensor:
    dev = world.device
    outs = []
    for i in range(0, len(seeds), batch_size):
        ps, ss = list(prompts[i : i + batch_size]), seeds[i : i + batch_size]
        cond = world.encode_prompt(ps)
        guided = guidance != 1.0
        ctx = torch.cat([world.encode_prompt([""] * len(ps)), cond]) if guided else cond
        x = initial_noise(ss, world.image_size).to(dev)
        for t in sched.timesteps:
            out = unet(torch.cat([x, x]) if guided else x, t, encoder_hidden_states=ctx).sample
            if guided:
                o_u, o_c = out.chunk(2)
                out = o_u + guidance * (o_c - o_u)
            x = sched.step(out, t, x).prev_sample
        outs.append(x.clamp(-1, 1).cpu())
    return torch.cat(outs) if outs else torch.empty(0, 3, world.image_size, world.image_size)
