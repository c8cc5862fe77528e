"""``lora-merge calibrate``: per-layer input second moments of the base UNet on real inputs.

For each selected layer, a forward pre-hook accumulates ``Σ x xᵀ`` (fp32) over every input vector the
layer sees — tokens for ``Linear`` layers, positions (unfolded patches for k×k kernels) for ``Conv2d`` —
while the base model (no LoRA) denoises noisy latents of the reference images at seeded timesteps with
their prompt.  Content images + content prompt give ``Σ_c``, style images + style prompt give ``Σ_s``;
``Σ = E[x xᵀ]`` is written in the stats format of :mod:`lora_merge.input_models`, so the weight-space
``ziplora``/``duolora`` can run with ``input_model=stats`` (docs/algorithms.md §8).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ATTENTION_TARGETS
from ..errors import UsageError
from ..files import refuse_existing
from ..input_models import save_stats
from ..masks import References
from ..patterns import matches
from ..progress import progress_bar
from .base_model import BaseModel
from .lora_layers import UNET_PREFIX
from .references import encode_references

#: the layers LoRA trainers target by default (diffusers/PEFT/kohya attention LoRAs)


@dataclass
class Moments:
    """Accumulated second moments per layer and role (``content`` / ``style``)."""

    sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def mean(self, name: str, role: str) -> torch.Tensor:
        return self.sums[name][role] / max(1, self.counts[name][role])


def select_layers(
    unet: nn.Module,
    *,
    adapters: Sequence[Any] = (),
    pattern: str | None = None,
    prefix: str = UNET_PREFIX,
) -> list[str]:
    """Canonical names (``unet.…``) of the layers to record: the UNet layers the adapters touch, or every
    attention projection (``to_q``/``to_k``/``to_v``/``to_out.0``) when no adapter is given; then
    filtered by ``pattern`` (see :mod:`lora_merge.patterns`)."""
    if adapters:
        names = list(dict.fromkeys(n for ad in adapters for n in ad.modules if n.startswith(prefix)))
        if not names:
            raise UsageError("the adapter(s) have no UNet layers to calibrate")
    else:
        names = [prefix + n for n, m in unet.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d)) and n.endswith(ATTENTION_TARGETS)]  # fmt: skip
    for n in names:
        try:
            mod = unet.get_submodule(n[len(prefix) :])
        except AttributeError:
            raise UsageError(
                f"the base model has no layer {n!r}; wrong base model for this adapter?"
            ) from None
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            raise UsageError(
                f"layer {n!r} is a {type(mod).__name__}; only Linear and Conv2d inputs are recorded"
            )
    if pattern:
        names = [n for n in names if matches(pattern, n)]
        if not names:
            raise UsageError(f"--layers {pattern!r} matches no layer")
    return names


def _input_vectors(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input vectors a LoRA on ``module`` multiplies: ``(-1, d_in)`` in fp32."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).float()
    if tuple(module.kernel_size) == (1, 1) and module.stride in (1, (1, 1)):
        return x.float().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    cols = F.unfold(
        x.float(), module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
    )  # N × (c·kh·kw) × L
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def record_moments(
    base: BaseModel,
    names: Sequence[str],
    references: References,
    *,
    samples: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = False,
    prefix: str = UNET_PREFIX,
) -> Moments:
    """Accumulate ``Σ x xᵀ`` per layer for the content and the style role.

    Each image is noised ``samples`` times (seeded noise and uniform timesteps) and run through the base
    UNet with its role's prompt.
    """
    if samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    mom = Moments()
    state = {"role": None}
    handles = []

    def hook_for(name: str, module: nn.Module):
        def hook(mod, args):
            v = _input_vectors(mod, args[0])
            role = state["role"]
            acc = mom.sums[name]
            acc[role] = acc[role] + v.T @ v
            mom.counts[name][role] += int(v.shape[0])

        return hook

    unet = base.unet
    for n in names:
        mod = unet.get_submodule(n[len(prefix) :])
        d = (
            mod.in_features
            if isinstance(mod, nn.Linear)
            else mod.in_channels * int(torch.tensor(mod.kernel_size).prod())
        )
        dev = mod.weight.device
        mom.sums[n] = {r: torch.zeros(d, d, dtype=torch.float32, device=dev) for r in ("content", "style")}
        mom.counts[n] = {"content": 0, "style": 0}
        handles.append(mod.register_forward_pre_hook(hook_for(n, mod)))
    work = [(role, lat, cond) for role, (lat, cond) in encode_references(base, references, "calibrate").items()]
    gen = torch.Generator().manual_seed(int(seed))
    total = sum(((lat.shape[0] * samples) + batch_size - 1) // batch_size for _, lat, _ in work)
    try:
        done = 0
        with progress_bar("calibrating", enabled=progress) as bar, torch.no_grad():
            for role, lat, cond in work:
                state["role"] = role
                rep = lat.repeat_interleave(samples, dim=0)
                for chunk in rep.split(batch_size):
                    noise = torch.randn(chunk.shape, generator=gen).to(chunk.device, chunk.dtype)
                    t = torch.randint(0, base.num_train_timesteps, (chunk.shape[0],), generator=gen).to(
                        chunk.device
                    )
                    base.predict(base.add_noise(chunk, noise, t), t, cond)
                    done += 1
                    if bar is not None:
                        bar(done, total, role)
    finally:
        for h in handles:
            h.remove()
    return mom


def calibrate(
    base: BaseModel,
    output: str | os.PathLike,
    references: References,
    *,
    adapters: Sequence[Any] = (),
    layers: str | None = None,
    samples: int = 4,
    batch_size: int = 8,
    rank: int | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Record and write the stats file; returns a summary (layers, counts, sizes)."""
    out = Path(output)
    refuse_existing(out, force, inputs=[getattr(ad, "source", None) for ad in adapters])
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be >= 1, got {rank}")
    names = select_layers(base.unet, adapters=adapters, pattern=layers)
    mom = record_moments(base, names, references, samples=samples, batch_size=batch_size, seed=seed,
                         progress=progress)  # fmt: skip
    stats: dict[str, dict[str, Any]] = {}
    for n in names:
        stats[n] = {}
        for role in ("content", "style"):
            sig = mom.mean(n, role)
            stats[n][role] = sig if rank is None else _low_rank(sig, rank)
    first = names[0]
    counts = {role: mom.counts[first][role] for role in ("content", "style")}
    md = {
        "base_model": base.name,
        "arch": str(base.arch),
        "content_prompt": references.content.prompt,
        "style_prompt": references.style.prompt,
        "samples_per_image": str(samples),
        "seed": str(seed),
        "rank": "full" if rank is None else str(rank),
        "vector_counts": json.dumps({n: mom.counts[n] for n in names}),
        "producer": "lora-merge calibrate",
    }
    save_stats(out, stats, counts=counts, metadata=md, force=force)
    return {"output": os.fspath(out), "layers": len(names), "counts": counts, "rank": md["rank"],
            "bytes": out.stat().st_size, "names": names}  # fmt: skip


def _low_rank(sigma: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of a PSD matrix as ``(U, S)`` with ``Σ ≈ U diag(S) Uᵀ``."""
    lam, v = torch.linalg.eigh(0.5 * (sigma + sigma.T).double())
    k = min(k, lam.shape[0])
    return v[:, -k:].flip(1).float(), lam[-k:].flip(0).clamp_min(0).float()
