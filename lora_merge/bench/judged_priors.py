"""The judged experiment behind measured priors, on the toy world (docs/priors.md).

The paper's own experiment: for each block group ``g``, generate with each LoRA's layers in ``g`` scaled
down and score the images with the toy world's judge::

    lost_L(g) = (acc_full − acc_without_g) / (acc_full − acc_base)

— the same "fraction of the LoRA's effect lost" as the noise measure
(:mod:`lora_merge.model_mode.measure_priors`), in judged accuracy.  Roles follow
:func:`lora_merge.priors.measured.assign_role`; :func:`lora_merge.priors.measured.compare` sets the two
side by side.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..model_mode.measure_priors import ProgressFn, probe_groups
from ..priors.measured import DEFAULT_FLOOR, DEFAULT_MARGIN, MeasuredPriors, from_losses
from ..toyworld import CONTENT_PROMPT, STYLE_PROMPT
from ..toyworld.judge import load_judge
from ..toyworld.model import ARCH, load_base
from .quality import evaluate

if TYPE_CHECKING:
    from ..adapter import Adapter


def judge_priors(
    content: Adapter,
    style: Adapter,
    *,
    granularity: str | None = "resolution",
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
    device: Any = "cpu",
    progress: ProgressFn | None = None,
) -> MeasuredPriors:
    """The paper's experiment on the toy world: for each group, sample ``n`` images (fixed seeds) of each
    LoRA's prompt with that LoRA's layers in the group scaled to ``scale``, and judge them.

    ``lost_content(g) = (acc_full − acc_g) / (acc_full − acc_base)`` with ``acc`` the judged accuracy of
    the held-out shape on the content prompt (``acc_base``: no LoRA), likewise for the style.
    ``progress(done, total, description)`` is called after each judged evaluation."""
    if not 0.0 <= scale < 1.0:
        raise UsageError(f"--scale must be in [0, 1) (the strength a group is scaled down to), got {scale}")
    granularity = granularity or "resolution"  # the toy world is a UNet
    wm = world_model or load_base(device=device)
    jd = judge or load_judge()
    cp = content_prompt or CONTENT_PROMPT
    sp = style_prompt or STYLE_PROMPT
    groups, unprobed = probe_groups(wm, content, style, int(wm.image_size), granularity)
    done, total = [0], judge_work(len(groups))
    if progress:
        progress(0, total, "judged experiment")

    def acc(adapter, prompt, key, scales=None) -> float:
        r = evaluate(adapter, n=n, seed=seed, prompt=prompt, lora_group_scales=scales, steps=steps, world_model=wm,
                     judge=jd)
        done[0] += 1
        if progress:
            progress(done[0], total, "judged experiment")
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
    return from_losses("judge", ARCH, granularity, groups, lost["content"], lost["style"], settings, unprobed)


def judge_work(n_groups: int) -> int:
    """Progress-bar length of :func:`judge_priors` (judged evaluations)."""
    return 2 * (n_groups + 2)
