"""The noise-prediction measure of layer priors on a diffusers UNet or DiT (docs/priors.md).

DuoLoRA's priors (low resolution → content, high → style) come from one experiment on SDXL: scale
down one group of layers and see whether the subject or the style is lost.  This module repeats it on
any diffusers UNet — and on FLUX.1 / SD3 transformers (:mod:`lora_merge.model_mode.dit_base`; groups are
transformer blocks, :func:`lora_merge.priors.measured.group_dit_modules`, the LoRAs attached in the
diffusers layout) — cheaply: for each block group ``g`` (:func:`lora_merge.priors.measured.group_modules`)
and each LoRA ``L`` on its own reference images and prompt, on a fixed seeded set of noisy latents
``x_t`` and timesteps ``t``::

    lost_L(g) = Σ ‖ε_full − ε_without_g‖² / Σ ‖ε_full − ε_base‖²

``ε_full``: the UNet with ``L`` at strength 1; ``ε_without_g``: the same with ``L``'s layers in ``g``
scaled to ``scale`` (0 = removed); ``ε_base``: without ``L``.  The sums run over the whole set, so
``lost_L(g)`` is the fraction of ``L``'s effect on its own images that depends on ``g``.  Roles follow
the rule of :func:`lora_merge.priors.measured.assign_role`.

Entry points: :func:`measure_priors` (a loaded model, tensors), :func:`measure` (what ``lora-merge priors
measure`` runs), :func:`measure_for_model` and :func:`measured_priors_for` (``duolora --priors measure``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..arch import unet_block_resolutions
from ..errors import UsageError
from ..files import parse_dtype
from ..formats.dit_arch import FUSED_LAYOUTS
from ..formats.layout import align
from ..priors.measured import (
    DEFAULT_FLOOR,
    DEFAULT_MARGIN,
    BlockGroup,
    MeasuredPriors,
    from_losses,
    group_dit_modules,
    group_modules,
    to_layer_priors,
)
from ..priors.table import LayerPriors
from .base_model import base_model_names, load_base_model
from .images import is_image_source, load_image_source, resolve_images
from .lora_layers import attach_loras

if TYPE_CHECKING:
    from ..adapter import Adapter

#: ``(steps done, steps in all, description)``, the progress callback of long-running functions
ProgressFn = Callable[[int, int, str], None]


def _counter(progress: ProgressFn | None, total: int, description: str) -> Callable[[int], None] | None:
    """An ``advance(k)`` over ``progress`` (None stays None)."""
    if progress is None:
        return None
    done = [0]
    progress(0, total, description)

    def advance(k: int) -> None:
        done[0] += k
        progress(done[0], total, description)

    return advance


def noise_work(n_groups: int) -> int:
    """Steps :func:`measure_priors` reports to ``progress`` for ``n_groups`` groups."""
    return 2 * (n_groups + 2)


def _block_resolutions(unet: Any, latent_size: int) -> dict[str, int]:
    try:
        return unet_block_resolutions(unet, latent_size)
    except ValueError:
        raise UsageError("the base model's denoiser is not a UNet with down/mid/up blocks; "
                         "measured priors support diffusers UNet2DConditionModel only") from None


# ------------------------------------------------------------------------------ noise measurement
@dataclass
class FixedSet:
    """Noisy latents, their timesteps and noise — the same for every forward pass of a measurement."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor


def fixed_noisy_set(latents: torch.Tensor, base: Any, n_noise: int, seed: int) -> FixedSet:
    """``n_noise`` noise draws per image with stratified timesteps over the whole training range,
    from a generator seeded by ``seed`` only (same seed → same set)."""
    g = torch.Generator().manual_seed(int(seed))
    lat = latents.detach().float().cpu()
    total = int(base.scheduler.config.num_train_timesteps)
    reps = lat.repeat_interleave(n_noise, dim=0)
    noise = torch.randn(reps.shape, generator=g)
    k = reps.shape[0]
    # stratified: sample j falls in stratum j of k equal strata, shuffled over images
    u = (torch.arange(k, dtype=torch.float64) + torch.rand(k, generator=g, dtype=torch.float64)) / k
    t = (u * total).long().clamp_(0, total - 1)[torch.randperm(k, generator=g)]
    noisy = base.add_noise(reps, noise, t)
    return FixedSet(noisy=noisy, timesteps=t, noise=noise)


def _predict(base: Any, fixed: FixedSet, cond: dict[str, Any], batch_size: int) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, fixed.noisy.shape[0], batch_size):
            x = fixed.noisy[i:i + batch_size].to(device=base.device, dtype=base.dtype)
            t = fixed.timesteps[i:i + batch_size].to(base.device)
            outs.append(base.predict(x, t, _rows(cond, i, x.shape[0])).float().cpu())
    return torch.cat(outs)


def _rows(cond: Any, start: int, n: int) -> Any:
    """Rows ``start:start+n`` of per-sample conditioning; batch-1 tensors are left to broadcast."""
    if isinstance(cond, dict):
        return {k: _rows(v, start, n) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.dim() > 0 and cond.shape[0] > 1:
        return cond[start:start + n]
    return cond


def concept_cond(base: Any, prompts: str | Sequence[str], n_images: int, n_noise: int) -> dict[str, Any]:
    """UNet conditioning for a concept's fixed set: one prompt for all images, or one per image
    (repeated for each of its ``n_noise`` noisy versions, the order :func:`fixed_noisy_set` uses)."""
    if isinstance(prompts, str):
        return base.encode_prompt([prompts])
    prompts = list(prompts)
    if len(prompts) == 1:
        return base.encode_prompt(prompts)
    if len(prompts) != n_images:
        raise UsageError(f"{len(prompts)} prompts for {n_images} reference images (give one, or one per image)")

    def rep(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: rep(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n_images:
            return v.repeat_interleave(n_noise, dim=0)
        return v

    return rep(base.encode_prompt(prompts))


def lost_fractions(base: Any, loras: Any, which: int, fixed: FixedSet, cond: dict[str, Any],
                   groups: Sequence[BlockGroup], scale: float, batch_size: int,
                   progress: Callable[[int], None] | None = None) -> tuple[list[float], float]:
    """``lost(g)`` of input ``which`` of ``loras`` (a :class:`~lora_merge.model_mode.lora_layers.LoraSet`)
    for every group, and ``Σ‖ε_full − ε_base‖²`` (the LoRA's effect on its own images)."""
    off = [0.0] * loras.num_inputs
    alone = [1.0 if i == which else 0.0 for i in range(loras.num_inputs)]
    with loras.configured(off, use_masks=False):
        eps_base = _predict(base, fixed, cond, batch_size)
    with loras.configured(alone, use_masks=False):
        eps_full = _predict(base, fixed, cond, batch_size)
        effect = float((eps_full.double() - eps_base.double()).pow(2).sum())
        if progress:
            progress(2)
        if effect <= 0.0 or not math.isfinite(effect):
            raise UsageError("a LoRA does not change the model's prediction on its reference images "
                             "(is it empty, or not for this base model?)")
        lost = []
        for g in groups:
            with loras.scaled(list(g.modules), scale, inputs=[which]):
                eps_g = _predict(base, fixed, cond, batch_size)
            lost.append(float((eps_full.double() - eps_g.double()).pow(2).sum()) / effect)
            if progress:
                progress(1)
    return lost, effect


def measure_priors(
    base: Any,
    content: Adapter,
    style: Adapter,
    *,
    content_images: torch.Tensor,
    content_prompt: str | Sequence[str],
    style_images: torch.Tensor,
    style_prompt: str | Sequence[str],
    granularity: str | None = None,
    scale: float = 0.0,
    n_noise: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    margin: float = DEFAULT_MARGIN,
    floor: float = DEFAULT_FLOOR,
    progress: ProgressFn | None = None,
) -> MeasuredPriors:
    """The noise-prediction measure (module docstring) on a loaded base model.

    ``base`` has ``unet``, ``scheduler``, ``encode_prompt(list[str]) -> dict of UNet kwargs`` and
    ``encode_images(images in [-1, 1]) -> latents`` (``lora_merge.model_mode.base_model.BaseModel``).
    Images are ``N × 3 × H × W`` tensors in [-1, 1]; a prompt is one string or one per image.
    ``progress(done, total, description)`` is called after each batch of forward passes."""
    if not 0.0 <= scale < 1.0:
        raise UsageError(f"--scale must be in [0, 1) (the strength a group is scaled down to), got {scale}")
    if n_noise < 1:
        raise UsageError("--samples must be at least 1")
    with torch.no_grad():
        lat_c = base.encode_images(content_images).float().cpu()
        lat_s = base.encode_images(style_images).float().cpu()
        cond_c = concept_cond(base, content_prompt, lat_c.shape[0], n_noise)
        cond_s = concept_cond(base, style_prompt, lat_s.shape[0], n_noise)
    prefix = getattr(base, "lora_prefix", "unet.")
    if prefix != "unet.":  # a DiT: its LoRAs are attached in the diffusers layout (fused modules split)
        content, style = (align(ad, None, layout="diffusers", family=base.arch) for ad in (content, style))
    granularity = granularity or ("resolution" if prefix == "unet." else "block")
    groups, unprobed = probe_groups(base, content, style, lat_c.shape[-1], granularity)
    tick = _counter(progress, noise_work(len(groups)), "noise measure")
    fixed_c = fixed_noisy_set(lat_c, base, n_noise, seed)
    fixed_s = fixed_noisy_set(lat_s, base, n_noise, seed + 1)
    loras = attach_loras(base.unet, [content, style], prefix=prefix)
    was_training = base.unet.training
    base.unet.eval()
    try:
        c_lost, c_eff = lost_fractions(base, loras, 0, fixed_c, cond_c, groups, scale, batch_size, tick)
        s_lost, s_eff = lost_fractions(base, loras, 1, fixed_s, cond_s, groups, scale, batch_size, tick)
    finally:
        loras.detach()
        base.unet.train(was_training)
    settings = {
        "seed": seed, "samples_per_image": n_noise, "scale": scale, "margin": margin, "floor": floor,
        "content_images": int(lat_c.shape[0]), "style_images": int(lat_s.shape[0]),
        "content_prompt": _prompt_summary(content_prompt), "style_prompt": _prompt_summary(style_prompt),
        "latent_size": int(lat_c.shape[-1]), "content_effect": c_eff, "style_effect": s_eff,
    }
    return from_losses("noise", getattr(base, "arch", None), granularity, groups, c_lost, s_lost, settings, unprobed)


def _prompt_summary(p: str | Sequence[str]) -> str:
    if isinstance(p, str):
        return p
    uniq = list(dict.fromkeys(p))
    return uniq[0] if len(uniq) == 1 else f"{len(uniq)} prompts, e.g. {uniq[0]!r}"


def load_references(model: Any, content_images: str | None, content_prompt: str | None,
                    style_images: str | None, style_prompt: str | None, n_images: int = 16,
                    seed: int = 0) -> tuple[torch.Tensor, Any, torch.Tensor, Any]:
    """``(content images, prompt(s), style images, prompt(s))``.  Images: a folder or a registered image
    source (``toyworld:content`` / ``toyworld:style``: ``n_images`` of the bundled LoRAs' training renders,
    their training captions the default prompts).  A concept given no images uses the source
    ``<arch>:<concept>`` when the model's architecture registers one (the toy world does); otherwise the
    four are required."""
    arch = getattr(model, "arch", None)
    out: list[Any] = []
    missing = []
    for concept, spec, prompt in (("content", content_images, content_prompt), ("style", style_images, style_prompt)):
        if not spec and arch and is_image_source(f"{arch}:{concept}"):
            spec = f"{arch}:{concept}"
        if spec and is_image_source(spec):
            imgs, captions = load_image_source(str(spec), model.image_size, n_images, seed)
            prompt = prompt or captions
            if not prompt:
                missing.append(f"--{concept}-prompt")
            out += [imgs, prompt]
            continue
        if not spec:
            missing.append(f"--{concept}-images")
        if not prompt:
            missing.append(f"--{concept}-prompt")
        if spec and prompt:
            out += [resolve_images(spec, model.image_size), prompt]
    if missing:
        raise UsageError(f"measured priors need {', '.join(missing)} (the reference images and prompts of each LoRA)")
    return out[0], out[1], out[2], out[3]


def probe_groups(base: Any, content: Adapter, style: Adapter, latent_size: int,
                 granularity: str) -> tuple[list[BlockGroup], list[str]]:
    """The groups a measurement probes (denoiser layers of either LoRA) and the names it leaves at full
    strength (text-encoder layers, UNet layers outside the down/mid/up blocks, DiT embedders)."""
    names = [m.name for m in content] + [m.name for m in style]
    prefix = getattr(base, "lora_prefix", "unet.")
    own = [n for n in names if n.startswith(prefix)]
    if prefix == "unet.":
        groups, unprobed = group_modules(own, _block_resolutions(base.unet, latent_size), granularity)
    else:
        layout = FUSED_LAYOUTS.get(base.arch)
        twins = (lambda b: tuple(t for t in [layout.native_block(b)] if t)) if layout else None
        groups, unprobed = group_dit_modules(own, granularity, twins)
    if not groups:
        where = "UNet" if prefix == "unet." else "transformer"
        raise UsageError(f"neither LoRA has layers in the base model's {where} blocks; nothing to measure")
    return groups, sorted(set(unprobed) | (set(names) - set(own)))


def measure(
    base: str,
    content: Adapter,
    style: Adapter,
    *,
    content_images: str | None = None,
    content_prompt: str | None = None,
    style_images: str | None = None,
    style_prompt: str | None = None,
    n_images: int = 16,
    device: Any = "cpu",
    dtype: str | torch.dtype = "fp32",
    allow_pickle: bool = False,
    **settings: Any,
) -> MeasuredPriors:
    """``lora-merge priors measure`` (noise measure): load ``base`` (a pipeline folder or a registered
    name), its reference images and prompts (:func:`load_references`), and run :func:`measure_priors` with
    ``settings`` (its keyword arguments: granularity, scale, n_noise, seed, batch_size, margin, floor,
    progress)."""
    model = load_base_model(base, device=device, dtype=parse_dtype(dtype), allow_pickle=allow_pickle)
    imgs_c, prm_c, imgs_s, prm_s = load_references(model, content_images, content_prompt, style_images,
                                                   style_prompt, n_images=n_images, seed=settings.get("seed", 0))
    return measure_priors(model, content, style, content_images=imgs_c, content_prompt=prm_c, style_images=imgs_s,
                          style_prompt=prm_s, **settings)


def measured_priors_for(config: dict[str, Any], adapters: Sequence[Adapter], *, device: Any = "cpu",
                        seed: int = 0, allow_pickle: bool = False) -> tuple[LayerPriors, MeasuredPriors]:
    """``duolora --priors measure``: load ``config["base"]``, run the noise measure on the strategy's
    reference images and prompts, return ``(LayerPriors, MeasuredPriors)``.

    Needs ``base`` (a pipeline folder or a registered model name) and, unless the model's architecture
    registers reference images, the content/style images and prompts; a missing one is a
    :class:`UsageError` (never a fallback to a table)."""
    base = config.get("base")
    if not base:
        named = ", ".join(repr(n) for n in base_model_names())
        raise UsageError(f"--priors measure needs --base MODEL (a diffusers pipeline folder or one of {named}) and, "
                         "for a pipeline folder, --content-images/--content-prompt/--style-images/--style-prompt: "
                         "the roles are measured by running the base model on the reference images")
    model = load_base_model(str(base), device=device or "cpu", allow_pickle=allow_pickle)
    return measure_for_model(model, adapters, config.get("content_images"), config.get("content_prompt"),
                             config.get("style_images"), config.get("style_prompt"), int(seed or 0))


def measure_for_model(model: Any, adapters: Sequence[Adapter], content_images: Any, content_prompt: str | None,
                      style_images: Any, style_prompt: str | None, seed: int = 0):
    """The noise measure with default settings on a loaded model, as ``(LayerPriors, MeasuredPriors)`` —
    what ``--priors measure`` uses in weight space and in model mode.  Images: tensors, folders or
    registered image sources (:func:`load_references`)."""
    if len(adapters) != 2:
        raise UsageError(f"--priors measure needs exactly 2 inputs (content, style), got {len(adapters)}")
    if isinstance(content_images, torch.Tensor) or isinstance(style_images, torch.Tensor):
        if not (content_prompt and style_prompt):
            raise UsageError("measured priors need --content-prompt and --style-prompt")
        imgs_c, prm_c = resolve_images(content_images, model.image_size), content_prompt
        imgs_s, prm_s = resolve_images(style_images, model.image_size), style_prompt
    else:
        imgs_c, prm_c, imgs_s, prm_s = load_references(model, content_images, content_prompt, style_images,
                                                       style_prompt, seed=seed)
    result = measure_priors(model, adapters[0], adapters[1], content_images=imgs_c, content_prompt=prm_c,
                            style_images=imgs_s, style_prompt=prm_s, seed=seed)
    src = f"measured on {getattr(model, 'name', '') or model.arch} (noise measure, seed {seed})"
    return to_layer_priors(result, source=src), result
