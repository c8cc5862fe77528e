"""Judging toy-world samples: per-adapter accuracies, one benchmark row's merge and judgement, PNG grids.

The rows themselves (which strategies with which parameters) are in :mod:`lora_merge.bench.variants`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .. import load
from ..adapter import Adapter
from ..engine import merge
from ..errors import UsageError
from ..sampling_time import available_sampling_time
from ..sampling_time import build as build_sampling_merger
from ..toyworld import JOINT_PROMPT, world
from ..toyworld.judge import load_judge
from ..toyworld.model import ARCH, load_base
from ..toyworld.sampling import DEFAULT_STEPS, sample
from .grid import save_grid as _save_grid
from .metrics import judge_metrics
from .variants import Variant


@lru_cache(maxsize=1)
def _cached_base():
    return load_base()


@lru_cache(maxsize=1)
def _cached_judge():
    return load_judge()


def eval_seeds(n: int, seed: int = 0) -> list[int]:
    """The fixed sampling seeds of an evaluation (independent of the adapter)."""
    return [seed * 1_000_003 + i for i in range(n)]


def judge_images(images: torch.Tensor, shape: str | None, style: str | None, judge=None) -> dict[str, Any]:
    """Fractions of images judged to have ``shape`` / ``style`` / both (None: not asked, reported as None),
    and what the judge saw (the accuracy part of :func:`lora_merge.bench.metrics.judge_metrics`)."""
    m = judge_metrics(images, judge or _cached_judge(), shape, style)
    return {k: m[k] for k in ("n", "content_acc", "style_acc", "joint_acc", "shapes_seen", "styles_seen")}


def evaluate(adapter_or_path: Adapter | str | os.PathLike | None, n: int = 64, seed: int = 0,
             prompt: str = JOINT_PROMPT,
             *, scale: float = 1.0, lora_group_scales: Mapping[str, float] | None = None, steps: int | None = None,
             world_model=None, judge=None, return_images: bool = False, merger: Any = None) -> dict[str, Any]:
    """Sample ``n`` images of ``prompt`` (fixed seeds) with the adapter folded in, and judge them.

    Expected shape and style are read from the prompt (``"a sks object"`` asks for no style: its
    ``style_acc`` is None and ``joint_acc`` equals ``content_acc``).
    """
    shape, style = world.parse_prompt(prompt)
    if shape is None and style is None:
        raise UsageError(f"prompt {prompt!r} names no toy-world shape or style to judge")
    wm = world_model or _cached_base()
    imgs = sample(wm, prompt, eval_seeds(n, seed), adapter=adapter_or_path, scale=scale,
                  lora_group_scales=lora_group_scales, steps=steps or DEFAULT_STEPS, merger=merger)
    res = judge_images(imgs, shape, style, judge)
    res["prompt"] = prompt
    if return_images:
        res["images"] = imgs
    return res


def base_sanity(n_per_combo: int = 4, seed: int = 0, world_model=None, judge=None) -> dict[str, Any]:
    """Base-model samples of every seen shape × seen style, judged (the base model's sanity check: it
    should reach 80 % or more)."""
    wm = world_model or _cached_base()
    judge = judge or _cached_judge()
    combos = [(s, t) for s in world.SEEN_SHAPES for t in world.SEEN_STYLES]
    prompts = [world.caption(s, t) for s, t in combos for _ in range(n_per_combo)]
    seeds = eval_seeds(len(prompts), seed + 7)
    imgs = sample(wm, prompts, seeds)
    ps, pt = judge.predict(imgs)
    want_s = torch.tensor([judge.shapes.index(s) for s, _ in combos for _ in range(n_per_combo)])
    want_t = torch.tensor([judge.styles.index(t) for _, t in combos for _ in range(n_per_combo)])
    return {
        "n": len(prompts),
        "content_acc": float((ps == want_s).float().mean()),
        "style_acc": float((pt == want_t).float().mean()),
        "joint_acc": float(((ps == want_s) & (pt == want_t)).float().mean()),
        "images": imgs,
        "combos": combos,
    }


# ------------------------------------------------------------------------------------------ merges
def trainable_values(report: dict[str, Any]) -> int | None:
    """Trainable-value count a strategy reports (ZipLoRA/DuoLoRA coefficients), if any."""
    strat = report.get("strategy") or {}
    for key in ("trainable_values", "trainable", "num_trainable", "trainable_params", "n_trainable"):
        if isinstance(strat.get(key), (int, float)):
            return int(strat[key])
    return None


def run_variant(v: Variant, content: Path, style: Path, n: int, seed: int = 0, world_model=None, judge=None,
                arch: str | None = ARCH, prompt: str = JOINT_PROMPT) -> dict[str, Any]:
    """Merge the two inputs as row ``v`` says, sample the joint ``prompt`` ``n`` times and judge it (a
    sampling-time merger, such as ``k-lora``, is attached while sampling instead)."""
    if v.prepare is not None:
        v.prepare()
    t0 = time.perf_counter()
    if v.strategy in available_sampling_time():
        merger = build_sampling_merger(v.strategy, load(content), load(style), weights=v.weights, **v.params)
        ev = evaluate(None, n=n, seed=seed, prompt=prompt, world_model=world_model, judge=judge,
                      return_images=True, merger=merger)
        ev.update(label=v.label, strategy=v.strategy, params=v.params, weights=list(v.weights), merge_seconds=None,
                  trainable_values=None, rank=None, mode="sampling")
        return ev
    res = merge([content, style], None, strategy=v.strategy, weights=list(v.weights), params=v.params or None,
                seed=seed, arch=arch)
    dt = time.perf_counter() - t0
    ev = evaluate(res.adapter, n=n, seed=seed, prompt=prompt, world_model=world_model, judge=judge,
                  return_images=True)
    ev.update(label=v.label, strategy=v.strategy, params=v.params, weights=list(v.weights), merge_seconds=dt,
              trainable_values=trainable_values(res.report), rank=max(res.adapter.ranks) if len(res.adapter) else 0)
    return ev


# ------------------------------------------------------------------------------------------- grids
def save_grid(rows: Sequence[tuple[str, torch.Tensor]], path: str | os.PathLike, zoom: int = 4,
              max_cols: int = 16, **kw: Any) -> Path:
    """A labelled PNG: one row per ``(label, images)``, written atomically (:func:`lora_merge.bench.grid.save_grid`:
    labels measured and wrapped to fit; ``kw``: a title, score columns, a best row)."""
    return _save_grid(rows, path, zoom=zoom, max_cols=max_cols, **kw)


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"
