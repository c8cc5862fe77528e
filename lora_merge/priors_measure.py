"""Measured layer priors: which UNet block groups carry a content LoRA and which a style LoRA.

DuoLoRA's priors (low resolution → content, high → style) come from one experiment on SDXL: scale
down one group of layers and see whether the subject or the style is lost.  This module repeats that
experiment on any diffusers UNet, two ways:

* **noise-prediction measure** (:func:`measure_priors`, cheap, any model): for each block group ``g``
  and each LoRA ``L`` on its own reference images and prompt, on a fixed seeded set of noisy latents
  ``x_t`` and timesteps ``t``::

      lost_L(g) = Σ ‖ε_full − ε_without_g‖² / Σ ‖ε_full − ε_base‖²

  ``ε_full``: the UNet with ``L`` at strength 1; ``ε_without_g``: the same with ``L``'s layers in ``g``
  scaled to ``scale`` (0 = removed); ``ε_base``: without ``L``.  The sums run over the whole set, so
  ``lost_L(g)`` is the fraction of ``L``'s effect on its own images that depends on ``g``.
* **judged experiment** (:func:`judge_priors`, the toy world): generate with ``g`` scaled down and
  score with the toy world's judge; ``lost_L(g) = (acc_full − acc_without_g) / (acc_full − acc_base)``
  — the same "fraction of the LoRA's effect lost", in judged accuracy.

**Role rule** (both methods, :func:`assign_role`): with ``c = lost_content(g)`` and
``s = lost_style(g)``, ``score = c − s``; the group is *neutral* when ``max(c, s) < floor`` (neither
LoRA depends on it) or ``|score| < margin`` (both depend on it about equally); otherwise it is
*content* when ``score > 0`` and *style* when ``score < 0``.  Defaults ``margin = 0.1``,
``floor = 0.05``.

Groups (``granularity``): ``resolution`` (default) — the UNet blocks holding LoRA layers, grouped by
the latent resolution they run at (SDXL 1024 px: 64 = ``down_blocks.1`` + ``up_blocks.1``,
32 = ``down_blocks.2`` + ``mid_block`` + ``up_blocks.0``); ``block`` — one group per UNet block;
``attention`` — one per attention sub-block (B-LoRA's unit, ``up_blocks.0.attentions.1``);
``layer`` — one per LoRA'd layer (slow on big models: two forward passes per layer and sample).
LoRA layers outside the UNet blocks (text encoder, ``conv_in``, time embedding) are never probed and
stay at full strength.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .arch import sub_block_of, unet_block_of
from .errors import UsageError

if TYPE_CHECKING:
    from .adapter import Adapter

GRANULARITIES = ("resolution", "block", "attention", "layer")
ROLES = ("content", "style", "neutral")
DEFAULT_MARGIN = 0.1
DEFAULT_FLOOR = 0.05

#: progress callback: (description, advance) — the CLI wires it to a rich progress bar
Progress = Callable[[str, int], None]


# --------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class BlockGroup:
    """One probed group: its display name, the UNet blocks (or sub-blocks / layers) it covers, the
    latent resolution (None when the group spans several), and the LoRA module names in it."""

    name: str
    blocks: tuple[str, ...]
    resolution: int | None
    modules: tuple[str, ...]


def unet_block_resolutions(unet: Any, latent_size: int) -> dict[str, int]:
    """Latent side length each UNet block runs at, for input latents of side ``latent_size``.

    Read from the block structure (a block with a downsampler halves the size for the next one, an
    upsampler doubles it), so it holds for any ``UNet2DConditionModel`` layout."""
    res: dict[str, int] = {}
    size = int(latent_size)
    for i, blk in enumerate(getattr(unet, "down_blocks", [])):
        res[f"down_blocks.{i}"] = size
        if getattr(blk, "downsamplers", None) is not None:
            size = max(1, (size + 1) // 2)
    if getattr(unet, "mid_block", None) is not None:
        res["mid_block"] = size
    for i, blk in enumerate(getattr(unet, "up_blocks", [])):
        res[f"up_blocks.{i}"] = size
        if getattr(blk, "upsamplers", None) is not None:
            size *= 2
    if not res:
        raise UsageError("the base model's denoiser is not a UNet with down/mid/up blocks; "
                         "measured priors support diffusers UNet2DConditionModel only")
    return res


def _block_sort_key(block: str) -> tuple[int, int, str]:
    if block.startswith("down_blocks"):
        return (0, int(block.split(".")[1]), block)
    if block.startswith("mid_block"):
        return (1, 0, block)
    return (2, int(block.split(".")[1]), block)


def group_modules(
    module_names: Iterable[str], resolutions: dict[str, int], granularity: str = "resolution"
) -> tuple[list[BlockGroup], list[str]]:
    """Split LoRA module names into probe groups; returns ``(groups, unprobed_names)``.

    Resolution groups are ordered from the lowest resolution (where the paper puts content) up."""
    if granularity not in GRANULARITIES:
        raise UsageError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    buckets: dict[str, list[str]] = {}
    blocks_of: dict[str, set[str]] = {}
    res_of: dict[str, set[int]] = {}
    unprobed: list[str] = []
    for name in sorted(set(module_names)):
        block = unet_block_of(name)
        if block is None or block not in resolutions:
            unprobed.append(name)
            continue
        if granularity == "resolution":
            key = f"{resolutions[block]}x{resolutions[block]}"
            member = block
        elif granularity == "block":
            key = member = block
        elif granularity == "attention":
            key = member = sub_block_of(name) or block
        else:
            key = member = name.removeprefix("unet.")
        buckets.setdefault(key, []).append(name)
        blocks_of.setdefault(key, set()).add(member)
        res_of.setdefault(key, set()).add(resolutions[block])
    groups = [
        BlockGroup(
            name=key,
            blocks=tuple(sorted(blocks_of[key], key=_block_sort_key)),
            resolution=next(iter(res_of[key])) if len(res_of[key]) == 1 else None,
            modules=tuple(buckets[key]),
        )
        for key in buckets
    ]
    if granularity == "resolution":
        groups.sort(key=lambda g: g.resolution or 0)
    else:
        groups.sort(key=lambda g: (_block_sort_key(g.blocks[0]), g.name))
    return groups, unprobed


# ----------------------------------------------------------------------------------------- roles
def assign_role(content_lost: float, style_lost: float, margin: float = DEFAULT_MARGIN,
                floor: float = DEFAULT_FLOOR) -> tuple[str, float]:
    """The documented rule: ``(role, score)`` with ``score = content_lost − style_lost``."""
    score = float(content_lost) - float(style_lost)
    if max(content_lost, style_lost) < floor or abs(score) < margin:
        return "neutral", score
    return ("content" if score > 0 else "style"), score


@dataclass
class GroupMeasure:
    group: BlockGroup
    content_lost: float
    style_lost: float
    role: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group.name,
            "blocks": list(self.group.blocks),
            "resolution": self.group.resolution,
            "num_modules": len(self.group.modules),
            "content_lost": self.content_lost,
            "style_lost": self.style_lost,
            "role": self.role,
            "score": self.score,
        }


@dataclass
class MeasuredPriors:
    """The result of a measurement: one :class:`GroupMeasure` per group plus how it was measured."""

    method: str  # "noise" or "judge"
    arch: str | None
    granularity: str
    groups: list[GroupMeasure]
    settings: dict[str, Any] = field(default_factory=dict)
    unprobed: list[str] = field(default_factory=list)

    def roles(self) -> dict[str, str]:
        return {g.group.name: g.role for g in self.groups}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "arch": self.arch,
            "granularity": self.granularity,
            "rule": {
                "score": "content_lost - style_lost",
                "neutral_if": "max(content_lost, style_lost) < floor or |score| < margin",
                "margin": self.settings.get("margin", DEFAULT_MARGIN),
                "floor": self.settings.get("floor", DEFAULT_FLOOR),
            },
            "settings": self.settings,
            "groups": [g.to_dict() for g in self.groups],
            "unprobed_modules": len(self.unprobed),
        }

    def with_rule(self, margin: float, floor: float) -> MeasuredPriors:
        """The same measurement with the roles re-assigned under another margin/floor."""
        groups = []
        for g in self.groups:
            role, score = assign_role(g.content_lost, g.style_lost, margin, floor)
            groups.append(GroupMeasure(g.group, g.content_lost, g.style_lost, role, score))
        return MeasuredPriors(self.method, self.arch, self.granularity, groups,
                              {**self.settings, "margin": margin, "floor": floor}, list(self.unprobed))


def _finish(method: str, arch: str | None, granularity: str, groups: Sequence[BlockGroup],
            content_lost: Sequence[float], style_lost: Sequence[float], settings: dict[str, Any],
            unprobed: list[str]) -> MeasuredPriors:
    margin = float(settings.get("margin", DEFAULT_MARGIN))
    floor = float(settings.get("floor", DEFAULT_FLOOR))
    out = []
    for g, c, s in zip(groups, content_lost, style_lost):
        role, score = assign_role(c, s, margin, floor)
        out.append(GroupMeasure(g, float(c), float(s), role, score))
    return MeasuredPriors(method, arch, granularity, out, {**settings, "margin": margin, "floor": floor}, unprobed)


def compare(a: MeasuredPriors, b: MeasuredPriors) -> list[dict[str, Any]]:
    """Per-group agreement of two measurements over the same groups (e.g. noise vs judge)."""
    by_name = {g.group.name: g for g in b.groups}
    rows = []
    for g in a.groups:
        other = by_name.get(g.group.name)
        rows.append({
            "group": g.group.name,
            f"{a.method}_role": g.role,
            f"{b.method}_role": other.role if other else None,
            "agree": other is not None and other.role == g.role,
        })
    return rows


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
    n_img = lat.shape[0]
    total = int(base.scheduler.config.num_train_timesteps)
    reps = lat.repeat_interleave(n_noise, dim=0)
    noise = torch.randn(reps.shape, generator=g)
    k = reps.shape[0]
    # stratified: sample j falls in stratum j of k equal strata, shuffled over images
    u = (torch.arange(k, dtype=torch.float64) + torch.rand(k, generator=g, dtype=torch.float64)) / k
    t = (u * total).long().clamp_(0, total - 1)[torch.randperm(k, generator=g)]
    noisy = base.add_noise(reps, noise, t)
    assert n_img * n_noise == k
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
                   progress: Progress | None = None) -> tuple[list[float], float]:
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
            progress("", 2)
        if effect <= 0.0 or not math.isfinite(effect):
            raise UsageError("a LoRA does not change the model's prediction on its reference images "
                             "(is it empty, or not for this base model?)")
        lost = []
        for g in groups:
            with loras.scaled(list(g.modules), scale, inputs=[which]):
                eps_g = _predict(base, fixed, cond, batch_size)
            lost.append(float((eps_full.double() - eps_g.double()).pow(2).sum()) / effect)
            if progress:
                progress("", 1)
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
    granularity: str = "resolution",
    scale: float = 0.0,
    n_noise: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    margin: float = DEFAULT_MARGIN,
    floor: float = DEFAULT_FLOOR,
    progress: Progress | None = None,
) -> MeasuredPriors:
    """The noise-prediction measure (module docstring) on a loaded base model.

    ``base`` has ``unet``, ``scheduler``, ``encode_prompt(list[str]) -> dict of UNet kwargs`` and
    ``encode_images(images in [-1, 1]) -> latents`` (``lora_merge.model_mode.base_model.BaseModel``).
    Images are ``N × 3 × H × W`` tensors in [-1, 1]; a prompt is one string or one per image."""
    if not 0.0 <= scale < 1.0:
        raise UsageError(f"--scale must be in [0, 1) (the strength a group is scaled down to), got {scale}")
    if n_noise < 1:
        raise UsageError("--samples must be at least 1")
    from .model_mode.lora_layers import attach_loras

    with torch.no_grad():
        lat_c = base.encode_images(content_images).float().cpu()
        lat_s = base.encode_images(style_images).float().cpu()
        cond_c = concept_cond(base, content_prompt, lat_c.shape[0], n_noise)
        cond_s = concept_cond(base, style_prompt, lat_s.shape[0], n_noise)
    groups, unprobed = probe_groups(base.unet, content, style, lat_c.shape[-1], granularity)
    fixed_c = fixed_noisy_set(lat_c, base, n_noise, seed)
    fixed_s = fixed_noisy_set(lat_s, base, n_noise, seed + 1)
    loras = attach_loras(base.unet, [content, style])
    was_training = base.unet.training
    base.unet.eval()
    try:
        c_lost, c_eff = lost_fractions(base, loras, 0, fixed_c, cond_c, groups, scale, batch_size, progress)
        s_lost, s_eff = lost_fractions(base, loras, 1, fixed_s, cond_s, groups, scale, batch_size, progress)
    finally:
        loras.detach()
        base.unet.train(was_training)
    settings = {
        "seed": seed, "samples_per_image": n_noise, "scale": scale, "margin": margin, "floor": floor,
        "content_images": int(lat_c.shape[0]), "style_images": int(lat_s.shape[0]),
        "content_prompt": _prompt_summary(content_prompt), "style_prompt": _prompt_summary(style_prompt),
        "latent_size": int(lat_c.shape[-1]), "content_effect": c_eff, "style_effect": s_eff,
    }
    return _finish("noise", getattr(base, "arch", None), granularity, groups, c_lost, s_lost, settings, unprobed)


def _prompt_summary(p: str | Sequence[str]) -> str:
    if isinstance(p, str):
        return p
    uniq = list(dict.fromkeys(p))
    return uniq[0] if len(uniq) == 1 else f"{len(uniq)} prompts, e.g. {uniq[0]!r}"


def load_references(model: Any, content_images: str | None, content_prompt: str | None,
                    style_images: str | None, style_prompt: str | None, n_images: int = 16,
                    seed: int = 0) -> tuple[torch.Tensor, Any, torch.Tensor, Any]:
    """``(content images, prompt(s), style images, prompt(s))``.  Images: a folder, or ``toyworld:content``
    / ``toyworld:style`` (the bundled LoRAs' training renders, ``n_images`` of them, with their training
    captions as the default prompts).  On the toy world a concept given nothing defaults to its own
    ``toyworld:<concept>``; on any other model the four are required."""
    from .model_mode.images import resolve_images

    toy = getattr(model, "arch", None) == "toyworld"
    out: list[Any] = []
    missing = []
    for concept, spec, prompt in (("content", content_images, content_prompt), ("style", style_images, style_prompt)):
        if not spec and toy:
            spec = f"toyworld:{concept}"
        if spec and str(spec).startswith("toyworld:"):
            from .toyworld.train import lora_training_set

            which = str(spec).split(":", 1)[1]
            if which not in ("content", "style"):
                raise UsageError(f"{spec!r}: use toyworld:content or toyworld:style")
            imgs, caps = lora_training_set(which, n_images, seed)
            if imgs.shape[-1] != model.image_size:
                imgs = torch.nn.functional.interpolate(imgs, size=(model.image_size,) * 2, mode="bilinear",
                                                       align_corners=False)
            out += [imgs, prompt or caps]
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


def probe_groups(unet: Any, content: Adapter, style: Adapter, latent_size: int,
                 granularity: str) -> tuple[list[BlockGroup], list[str]]:
    """The groups a measurement probes (UNet layers of either LoRA) and the names it leaves at full
    strength (text-encoder layers, UNet layers outside the down/mid/up blocks)."""
    names = [m.name for m in content] + [m.name for m in style]
    unet_names = [n for n in names if n.startswith("unet.")]
    groups, unprobed = group_modules(unet_names, unet_block_resolutions(unet, latent_size), granularity)
    if not groups:
        raise UsageError("neither LoRA has layers in the base model's UNet blocks; nothing to measure")
    return groups, sorted(set(unprobed) | (set(names) - set(unet_names)))


# ---------------------------------------------------------------------------------- judged (toy world)
def judge_priors(
    content: Adapter,
    style: Adapter,
    *,
    granularity: str = "resolution",
    scale: float = 0.0,
    n: int = 64,
    seed: int = 0,
    steps: int | None = None,
    content_prompt: str | None = None,
    style_prompt: str | None = None,
    margin: float = DEFAULT_MARGIN,
    floor: float = DEFAULT_FLOOR,
    world_model: Any = None,
    judge: Any = None,
    progress: Progress | None = None,
) -> MeasuredPriors:
    """The paper's experiment on the toy world: for each group, sample ``n`` images (fixed seeds) of each
    LoRA's prompt with that LoRA's layers in the group scaled to ``scale``, and judge them.

    ``lost_content(g) = (acc_full − acc_g) / (acc_full − acc_base)`` with ``acc`` the judged accuracy of
    the held-out shape on the content prompt (``acc_base``: no LoRA), likewise for the style."""
    from . import toyworld as tw
    from .toyworld.quality import evaluate

    if not 0.0 <= scale < 1.0:
        raise UsageError(f"--scale must be in [0, 1) (the strength a group is scaled down to), got {scale}")
    wm = world_model or tw.load_base()
    jd = judge or tw.load_judge()
    cp = content_prompt or tw.CONTENT_PROMPT
    sp = style_prompt or tw.STYLE_PROMPT
    groups, unprobed = probe_groups(wm.unet, content, style, int(wm.image_size), granularity)

    def acc(adapter, prompt, key, scales=None) -> float:
        r = evaluate(adapter, n=n, seed=seed, prompt=prompt, lora_group_scales=scales, steps=steps, world_model=wm,
                     judge=jd)
        if progress:
            progress("", 1)
        return float(r[key])

    lost: dict[str, list[float]] = {}
    accs: dict[str, dict[str, Any]] = {}
    for concept, adapter, prompt, key in (("content", content, cp, "content_acc"), ("style", style, sp, "style_acc")):
        base_acc = acc(None, prompt, key)
        full = acc(adapter, prompt, key)
        if full - base_acc < 0.05:
            raise UsageError(f"the {concept} LoRA has no judged effect on {prompt!r} (accuracy {full:.2f} with it, "
                             f"{base_acc:.2f} without); nothing to measure")
        per_group = [acc(adapter, prompt, key, {m: scale for m in g.modules}) for g in groups]
        lost[concept] = [(full - a) / (full - base_acc) for a in per_group]
        accs[concept] = {"prompt": prompt, "base": base_acc, "full": full,
                         "without_group": dict(zip([g.name for g in groups], per_group))}
    settings = {"seed": seed, "n": n, "steps": steps, "scale": scale, "margin": margin, "floor": floor,
                "content_prompt": cp, "style_prompt": sp, "accuracy": accs}
    return _finish("judge", "toyworld", granularity, groups, lost["content"], lost["style"], settings, unprobed)


def judge_work(n_groups: int) -> int:
    """Progress-bar length of :func:`judge_priors` (judged evaluations)."""
    return 2 * (n_groups + 2)


# ------------------------------------------------------------------------------------- priors file
def group_patterns(group: BlockGroup) -> list[str]:
    """Priors-file patterns of a group: ``unet.<block>`` per member (a layer name for ``layer``)."""
    return [b if b.startswith("unet.") else f"unet.{b}" for b in group.blocks]


def to_layer_priors(result: MeasuredPriors, source: str | None = None):
    """The measurement as a :class:`~lora_merge.priors.LayerPriors` (the user priors-file format).

    One rule per block of each group, with the group's role; ``score = min(1, |content_lost −
    style_lost|)`` (how clearly the group belongs to its role; DuoLoRA multiplies its prior term by it)."""
    from .priors import LayerPriors, PriorRule

    rules = []
    for g in result.groups:
        score = round(min(1.0, abs(g.score)), 4)
        for pat in group_patterns(g.group):
            rules.append(PriorRule(pat, g.role, score, g.group.resolution))
    src = source or (f"measured by lora-merge priors measure ({result.method}, granularity "
                     f"{result.granularity}, seed {result.settings.get('seed')})")
    return LayerPriors(rules, result.arch, src, "neutral", name="measured")


def priors_document(result: MeasuredPriors, source: str | None = None) -> dict[str, Any]:
    """The priors file's content: the user format plus a ``measurement`` section (ignored by readers)."""
    doc = to_layer_priors(result, source).to_dict()
    doc["measurement"] = result.to_dict()
    return doc


def write_priors(result: MeasuredPriors, path: str | Path, force: bool = False, source: str | None = None) -> Path:
    """Write the priors file (JSON; YAML for ``.yaml``/``.yml``) atomically; refuses to overwrite
    without ``force``.  ``lora_merge.priors.load_priors(path)`` reads it back."""
    import json
    import os

    from .errors import OutputExistsError

    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError("exists (use --force to overwrite)", path)
    doc = priors_document(result, source)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(doc, sort_keys=False)
    else:
        text = json.dumps(doc, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------- strategy hook
#: strategy parameters ``priors=measure`` reads (the model-mode parameters of ziplora/duolora)
MEASURE_PARAMS = ("base", "content_images", "content_prompt", "style_images", "style_prompt")


def measured_priors_for(config: dict[str, Any], adapters: Sequence[Adapter], context: dict[str, Any]):
    """``duolora --priors measure`` (weight space): load ``config["base"]``, run the noise measure on the
    strategy's reference images and prompts, return ``(LayerPriors, MeasuredPriors)``.

    Needs ``base`` (a pipeline folder or ``toyworld``) and, for a pipeline folder, the content/style images
    and prompts; a missing one is a :class:`UsageError` (never a fallback to a table)."""
    base = config.get("base")
    if not base:
        raise UsageError("--priors measure needs --base MODEL (a diffusers pipeline folder or 'toyworld') and, "
                         "for a pipeline folder, --content-images/--content-prompt/--style-images/--style-prompt: "
                         "the roles are measured by running the base model on the reference images")
    from .model_mode.base_model import load_base_model

    model = load_base_model(str(base), device=context.get("device", "cpu"))
    return measure_for_model(model, adapters, config.get("content_images"), config.get("content_prompt"),
                             config.get("style_images"), config.get("style_prompt"), int(context.get("seed", 0)))


def measure_for_model(model: Any, adapters: Sequence[Adapter], content_images: Any, content_prompt: str | None,
                      style_images: Any, style_prompt: str | None, seed: int = 0):
    """The noise measure with default settings on a loaded model, as ``(LayerPriors, MeasuredPriors)`` —
    what ``--priors measure`` uses in weight space and in model mode.  Images: tensors, folders or
    ``toyworld:content``/``toyworld:style``."""
    if len(adapters) != 2:
        raise UsageError(f"--priors measure needs exactly 2 inputs (content, style), got {len(adapters)}")
    if isinstance(content_images, torch.Tensor) or isinstance(style_images, torch.Tensor):
        from .model_mode.images import resolve_images

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


def toyworld_priors_file(seed: int = 0) -> Path:
    """Measure the bundled toy-world LoRAs with the default settings and write the priors to a file in the
    temp folder (rewritten on each call)."""
    import tempfile

    from . import load
    from . import toyworld as tw
    from .model_mode.base_model import load_base_model

    paths = tw.bundled_loras()
    model = load_base_model("toyworld")
    _, result = measure_for_model(model, [load(paths["content"]), load(paths["style"])], None, None, None, None,
                                  seed)
    return write_priors(result, Path(tempfile.gettempdir()) / f"lora-merge-toyworld-priors-{seed}.json", force=True)


def bench_variants(strategies: Sequence[str] | None = None) -> list:
    """``lora-merge bench quality`` rows: DuoLoRA with the paper's resolution rule on the toy world's blocks
    (the SDXL rule: 4×4 → content, 8×8 → style) next to DuoLoRA with priors measured on the toy world —
    in weight space, and in model mode when ``duolora`` offers ``--mode model`` (whose own
    ``duolora (model)`` row uses the rule)."""
    from .priors import builtin_priors
    from .strategies import available_strategies
    from .toyworld.quality import Variant

    avail = available_strategies()
    if "duolora" not in avail or (strategies and "duolora" not in strategies):
        return []
    declared = {p.name for p in avail["duolora"].params}
    rows = []
    if "toyworld" in builtin_priors():
        rows.append(Variant("duolora (SDXL-rule priors)", "duolora", {"priors": "toyworld"}))
    if "base" in declared:
        rows.append(Variant("duolora (measured priors)", "duolora", {"priors": "measure", "base": "toyworld"}))
    else:  # the same measurement (toy-world defaults, seed 0), handed over as a priors file
        rows.append(Variant("duolora (measured priors)", "duolora", {"priors": str(toyworld_priors_file())}))
    if "mode" in declared:
        from .model_mode.bench import toyworld_common

        # the SDXL-rule model-mode row is model mode's own "duolora (model)" (priors auto = the rule)
        rows.append(Variant("duolora (model, measured priors)", "duolora", {**toyworld_common(), "priors": "measure"}))
    return rows


# ------------------------------------------------------------------------------------------ plot
_ROLE_COLORS = {"content": (52, 101, 164), "style": (204, 0, 102), "neutral": (120, 120, 120)}
_BAR_COLORS = ((52, 101, 164), (204, 0, 102))


def plot_roles(result: MeasuredPriors, path: str | Path, title: str | None = None) -> Path:
    """Bar chart PNG: per group, the fraction of the content and of the style LoRA's effect lost when the
    group is scaled down, and the assigned role.  Uses matplotlib when installed, else draws with PIL."""
    path = Path(path)
    title = title or f"measured layer priors ({result.method}, {result.arch or 'model'})"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        img = _plot_pil(result, title)
        _atomic_save(img.save, path)
        return path
    _plot_matplotlib(result, title, path)
    return path


def _atomic_save(save: Callable[[str], Any], path: Path) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent or ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the PNG normal file permissions
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plot_matplotlib(result: MeasuredPriors, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [g.group.name for g in result.groups]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1.5), 3.6), dpi=120)
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [g.content_lost for g in result.groups], w, label="content lost",
           color=[c / 255 for c in _BAR_COLORS[0]])
    ax.bar([x + w / 2 for x in xs], [g.style_lost for g in result.groups], w, label="style lost",
           color=[c / 255 for c in _BAR_COLORS[1]])
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{g.group.name}\n{g.role}" for g in result.groups], fontsize=8)
    for lbl, g in zip(ax.get_xticklabels(), result.groups):
        lbl.set_color([c / 255 for c in _ROLE_COLORS[g.role]])
    ax.set_ylabel("fraction of the LoRA's effect lost")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_save(lambda p: fig.savefig(p, format="png"), path)
    plt.close(fig)


def _plot_pil(result: MeasuredPriors, title: str):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n = max(1, len(result.groups))
    slot, bar, plot_h, left, top, bottom = 110, 34, 220, 60, 56, 60
    width = max(400, left + slot * n + 20)
    height = top + plot_h + bottom
    vmax = max([1.0] + [max(g.content_lost, g.style_lost) for g in result.groups])
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill=(0, 0, 0), font=font)
    d.rectangle([width - 190, 22, width - 180, 32], fill=_BAR_COLORS[0])
    d.text((width - 175, 21), "content lost", fill=(0, 0, 0), font=font)
    d.rectangle([width - 100, 22, width - 90, 32], fill=_BAR_COLORS[1])
    d.text((width - 85, 21), "style lost", fill=(0, 0, 0), font=font)
    y0 = top + plot_h
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        v = frac * vmax
        y = y0 - int(plot_h * frac)
        d.line([left - 4, y, width - 10, y], fill=(225, 225, 225))
        d.text((8, y - 6), f"{v:.2f}", fill=(60, 60, 60), font=font)
    d.line([left, top, left, y0], fill=(0, 0, 0))
    d.line([left, y0, width - 10, y0], fill=(0, 0, 0))
    for i, g in enumerate(result.groups):
        x = left + slot * i + (slot - 2 * bar) // 2
        for j, v in enumerate((g.content_lost, g.style_lost)):
            h = int(plot_h * max(0.0, v) / vmax)
            d.rectangle([x + j * bar, y0 - h, x + (j + 1) * bar - 4, y0], fill=_BAR_COLORS[j])
            d.text((x + j * bar, y0 - h - 12), f"{v:.2f}", fill=(0, 0, 0), font=font)
        d.text((left + slot * i + 6, y0 + 8), g.group.name[:18], fill=(0, 0, 0), font=font)
        d.text((left + slot * i + 6, y0 + 24), f"{g.role} ({g.score:+.2f})", fill=_ROLE_COLORS[g.role], font=font)
    return img
