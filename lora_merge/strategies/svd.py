"""``svd``: the weighted sum, re-factored through QR of the factors and an SVD of the small core."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import linalg
from . import register
from .base import LayerContext, LayerInput, LayerResult, MergeStrategy, Param
from .linear import concat


@register
class Svd(MergeStrategy):
    name = "svd"
    description = "Weighted sum re-factored by SVD (from the factors) to --rank K or an energy threshold."
    reference = "docs/algorithms.md §3 (kohya svd_merge_lora.py / PEFT 'svd' do a dense SVD instead)"
    exact = False
    params = (
        Param(
            "energy",
            float,
            1.0,
            "keep the fewest singular directions holding this fraction of "
            "‖ΔW‖²_F (1 = all non-negligible ones; exact)",
            range=(0.0, 1.0),
        ),
        Param(
            "split",
            str,
            "sqrt",
            "how Σ is split between the factors: sqrt (B=U√Σ, A=√ΣVᵀ) or up (B=UΣ, A=Vᵀ, kohya's convention)",
            choices=("sqrt", "up"),
        ),
    )

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        up, down = concat(inputs)
        u, s, vh = linalg.core_svd(up, down)
        k = full = linalg.numerical_rank(s, (up.shape[0], down.shape[1]))
        if self.config["energy"] < 1.0 and k:
            e = torch.cumsum(s[:k] ** 2, 0) / (s[:k] ** 2).sum()
            k = min(k, int((e < self.config["energy"] - 1e-12).sum()) + 1)
        target = ctx.rank
        rule = f"--energy {self.config['energy']}" if k < full else None
        if target is not None and int(target) < k:
            k, rule = int(target), f"--rank {int(target)}"
        total = float((s**2).sum())
        u, s, vh = u[:, :k], s[:k], vh[:k]
        kept = float((s**2).sum())
        b, a = linalg.split_factors(u, s, vh, self.config["split"])
        info = {"svd_rank": k, "sigma_max": float(s[0]) if k else 0.0, "energy_kept": kept}
        if rule is not None:  # ‖ΔW − BA‖_F / ‖ΔW‖_F from the dropped singular values (the engine warns)
            info.update(truncation_rank_rule=rule, truncation_rel_error=max(0.0, 1 - kept / total) ** 0.5
                        if total > 0 else 0.0, truncation_norm=total**0.5)  # fmt: skip
        return LayerResult(up=b, down=a, info=info)
