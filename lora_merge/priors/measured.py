"""Measured layer priors as data: probe groups, the role rule and the result of a measurement.

The measurements themselves run a model: the noise-prediction measure on any diffusers UNet
(:mod:`lora_merge.model_mode.measure_priors`) and the judged experiment on the toy world
(:mod:`lora_merge.bench.judged_priors`).  Both give, per probed group ``g``, the fraction of each LoRA's
effect that is lost when its layers in ``g`` are scaled down, ``lost_content(g)`` and ``lost_style(g)``.

**Role rule** (:func:`assign_role`): with ``c = lost_content(g)`` and ``s = lost_style(g)``,
``score = c − s``; the group is *neutral* when ``max(c, s) < floor`` (neither LoRA depends on it) or
``|score| < margin`` (both depend on it about equally); otherwise it is *content* when ``score > 0`` and
*style* when ``score < 0``.  Defaults ``margin = 0.1``, ``floor = 0.05``.

Groups (``granularity``, :func:`group_modules`): ``resolution`` (default) — the UNet blocks holding LoRA
layers, grouped by the latent resolution they run at (SDXL 1024 px: 64 = ``down_blocks.1`` +
``up_blocks.1``, 32 = ``down_blocks.2`` + ``mid_block`` + ``up_blocks.0``); ``block`` — one group per UNet
block; ``attention`` — one per attention sub-block (B-LoRA's unit, ``up_blocks.0.attentions.1``);
``layer`` — one per LoRA'd layer.  LoRA layers outside the UNet blocks (text encoder, ``conv_in``, time
embedding) are never probed and stay at full strength.  A DiT (FLUX.1, SD3/3.5) has neither resolutions
nor UNet sub-blocks: :func:`group_dit_modules` makes one group per transformer block (``block``, its default)
or per layer.

:func:`to_layer_priors` turns a measurement into a :class:`~lora_merge.priors.table.LayerPriors`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arch import DIT_BLOCK_RE, block_sort_key, sub_block_of, unet_block_of
from ..errors import UsageError
from .table import ROLES, LayerPriors, PriorRule

__all__ = [
    "DEFAULT_FLOOR",
    "DEFAULT_MARGIN",
    "GRANULARITIES",
    "ROLES",
    "BlockGroup",
    "GroupMeasure",
    "MeasuredPriors",
    "assign_role",
    "compare",
    "from_losses",
    "group_dit_modules",
    "group_modules",
    "group_patterns",
    "priors_document",
    "to_layer_priors",
    "write_measured",
]

GRANULARITIES = ("resolution", "block", "attention", "layer")  # UNets; DiTs: DIT_GRANULARITIES
DEFAULT_MARGIN = 0.1
DEFAULT_FLOOR = 0.05


# --------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class BlockGroup:
    """One probed group: its display name, the UNet blocks (or sub-blocks / layers) it covers, the
    latent resolution (None when the group spans several), and the LoRA module names in it."""

    name: str
    blocks: tuple[str, ...]
    resolution: int | None
    modules: tuple[str, ...]


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
            blocks=tuple(sorted(blocks_of[key], key=block_sort_key)),
            resolution=next(iter(res_of[key])) if len(res_of[key]) == 1 else None,
            modules=tuple(buckets[key]),
        )
        for key in buckets
    ]
    if granularity == "resolution":
        groups.sort(key=lambda g: g.resolution or 0)
    else:
        groups.sort(key=lambda g: (block_sort_key(g.blocks[0]), g.name))
    return groups, unprobed


#: the order block lists run in (refiners before Z-Image's main layers, double before single streams)
_DIT_ORDER = {"noise_refiner": 0, "context_refiner": 0, "transformer_blocks": 1, "blocks": 1, "layers": 1,
              "single_transformer_blocks": 2}
DIT_GRANULARITIES = ("block", "layer")


def _dit_sort_key(block: str) -> tuple[int, str, int]:
    head, _, i = block.rpartition(".")
    return (_DIT_ORDER.get(head, 1), head, int(i))


def group_dit_modules(module_names: Iterable[str], granularity: str = "block",
                      twins: Callable[[str], tuple[str, ...]] | None = None) -> tuple[list[BlockGroup], list[str]]:
    """Probe groups of a DiT LoRA (module names in the diffusers layout): one per transformer block
    (``block``) or per layer (``layer``); a DiT has no latent resolutions.  ``twins(block_path)`` gives
    the block's names in the family's other layouts (``transformer.double_blocks.3`` for Flux's
    ``transformer.transformer_blocks.3``), so a priors file made from the groups applies to native and
    diffusers files alike.  Returns ``(groups, unprobed)``: modules outside the blocks (embedders, final
    layer, text encoders) are not probed."""
    if granularity not in DIT_GRANULARITIES:
        raise UsageError(f"granularity {granularity!r} is for UNets; a DiT has no latent resolutions or UNet "
                         f"sub-blocks: use {' or '.join(DIT_GRANULARITIES)}")
    buckets: dict[str, tuple[str, list[str]]] = {}  # group → (its block, its modules)
    unprobed: list[str] = []
    for name in sorted(set(module_names)):
        m = DIT_BLOCK_RE.match(name)
        if m is None:
            unprobed.append(name)
            continue
        key = m.group(1) if granularity == "block" else name.removeprefix("transformer.")
        buckets.setdefault(key, (m.group(1), []))[1].append(name)
    groups = []
    for key, (_block, mods) in sorted(buckets.items(), key=lambda kv: (_dit_sort_key(kv[1][0]), kv[0])):
        names = ("transformer." + key,)
        if twins is not None and granularity == "block":
            names += tuple(t for t in twins(names[0]) if t not in names)
        groups.append(BlockGroup(name=key, blocks=names, resolution=None, modules=tuple(mods)))
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


def from_losses(method: str, arch: str | None, granularity: str, groups: Sequence[BlockGroup],
            content_lost: Sequence[float], style_lost: Sequence[float], settings: dict[str, Any],
            unprobed: list[str]) -> MeasuredPriors:
    """A :class:`MeasuredPriors` from per-group lost fractions, roles assigned by :func:`assign_role` under
    ``settings``' margin and floor (defaults otherwise)."""
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


# ------------------------------------------------------------------------------------- priors file
def group_patterns(group: BlockGroup) -> list[str]:
    """Priors-file patterns of a group: ``unet.<block>`` per member (a layer name for ``layer``); DiT
    groups already hold ``transformer.<block>`` names (both layouts')."""
    return [b if b.startswith(("unet.", "transformer.")) else f"unet.{b}" for b in group.blocks]


def to_layer_priors(result: MeasuredPriors, source: str | None = None) -> LayerPriors:
    """The measurement as a :class:`~lora_merge.priors.LayerPriors` (the priors-file format).

    One rule per block of each group, with the group's role; ``score = min(1, |content_lost −
    style_lost|)`` (how clearly the group belongs to its role; DuoLoRA multiplies its prior term by it)."""
    rules = []
    for g in result.groups:
        score = round(min(1.0, abs(g.score)), 4)
        for pat in group_patterns(g.group):
            rules.append(PriorRule(pat, g.role, score, g.group.resolution))
    src = source or (f"measured by lora-merge priors measure ({result.method}, granularity "
                     f"{result.granularity}, seed {result.settings.get('seed')})")
    return LayerPriors(rules, result.arch, src, "neutral", name="measured")


def priors_document(result: MeasuredPriors, source: str | None = None) -> dict[str, Any]:
    """The priors file's content: the table plus a ``measurement`` section (ignored by readers)."""
    return {**to_layer_priors(result, source).to_dict(), "measurement": result.to_dict()}


def write_measured(result: MeasuredPriors, path: str | os.PathLike, force: bool = False,
                   source: str | None = None, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Write the measurement as a priors file (:meth:`LayerPriors.to_file`, with its ``measurement``
    section); :func:`lora_merge.priors.load_priors` reads it back."""
    return to_layer_priors(result, source).to_file(path, force, extra={"measurement": result.to_dict()},
                                                   inputs=inputs)
