"""The suite's metrics, as the papers report them, with 95 % bootstrap intervals.

* content / style / joint accuracy: the judge's shape head says the subject, its style head the style, or
  both (the classifier stand-in for a human rater);
* subject similarity: mean cosine between each sample's shape-head embedding and each content reference
  image's (the DINO score of DreamBooth/ZipLoRA, with the judge's shape features standing in for DINO);
* style similarity: mean cosine between each sample's style-head embedding and the style reference
  image's (CSD's role in ZipLoRA/K-LoRA);
* their harmonic mean (NP-LoRA's summary number).

Intervals are percentile bootstrap intervals over the images of a row (seeded, so a row's interval is
reproducible).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: bootstrap resamples per interval
BOOTSTRAP = 2000


def bootstrap_ci(values: Sequence[float] | torch.Tensor, level: float = 0.95, resamples: int = BOOTSTRAP,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (``(nan, nan)`` for no values)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        return (float("nan"), float("nan"))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (resamples, x.numel()), generator=g)
    means = x[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64))
    return (float(lo), float(hi))


def paired_bootstrap_ci(groups: Sequence[Sequence[float]], level: float = 0.95, resamples: int = BOOTSTRAP,
                        seed: int = 0) -> tuple[float, float]:
    """Interval of the mean over groups (pairs) of each group's mean: images are resampled within each
    group, so the interval is that of the suite's mean with the pairs fixed."""
    gs = [torch.as_tensor(v, dtype=torch.float64).flatten() for v in groups if len(v)]
    if not gs:
        return (float("nan"), float("nan"))
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(resamples, dtype=torch.float64)
    for x in gs:
        idx = torch.randint(0, x.numel(), (resamples, x.numel()), generator=g)
        total += x[idx].mean(1)
    means = total / len(gs)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64))
    return (float(lo), float(hi))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N, M)`` cosines between rows of ``a`` and rows of ``b``."""
    a = torch.nn.functional.normalize(a.double(), dim=1, eps=1e-12)
    b = torch.nn.functional.normalize(b.double(), dim=1, eps=1e-12)
    return a @ b.T


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def judge_metrics(images: torch.Tensor, judge, shape: str | None, style: str | None,
                  content_refs: torch.Tensor | None = None, style_refs: torch.Tensor | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Every metric of one row, with per-image values kept (``"per_image"``) for the suite means."""
    s_idx, t_idx = judge.predict(images)
    n = int(images.shape[0])
    ok_s = (s_idx == judge.shapes.index(shape)).double() if shape is not None else None
    ok_t = (t_idx == judge.styles.index(style)).double() if style is not None else None
    if ok_s is not None and ok_t is not None:
        both = ok_s * ok_t
    else:
        both = ok_s if ok_t is None else ok_t
    out: dict[str, Any] = {"n": n}
    per: dict[str, list[float]] = {}
    for key, v in (("content_acc", ok_s), ("style_acc", ok_t), ("joint_acc", both)):
        out[key] = None if v is None else float(v.mean())
        if v is not None:
            per[key] = v.tolist()
    if both is not None:
        out["joint_ci"] = list(bootstrap_ci(both, seed=seed))
    feats = judge.embeddings(images)
    for key, head, refs, salt in (("subject_sim", 0, content_refs, 1), ("style_sim", 1, style_refs, 2)):
        if refs is None:
            continue
        sim = _cos(feats[head], judge.embeddings(refs)[head]).mean(1)
        out[key] = float(sim.mean())
        out[f"{key}_ci"] = list(bootstrap_ci(sim, seed=seed + salt))
        per[key] = sim.tolist()
    if "subject_sim" in out and "style_sim" in out:
        out["hmean_sim"] = harmonic_mean(out["subject_sim"], out["style_sim"])
    out["shapes_seen"] = _counts([judge.shapes[i] for i in s_idx.tolist()])
    out["styles_seen"] = _counts([judge.styles[i] for i in t_idx.tolist()])
    out["per_image"] = per
    return out


def _counts(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for nm in names:
        out[nm] = out.get(nm, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


__all__ = ["BOOTSTRAP", "bootstrap_ci", "harmonic_mean", "judge_metrics", "paired_bootstrap_ci"]
