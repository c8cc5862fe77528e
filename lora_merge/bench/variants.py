"""Toy-world benchmark rows of model mode (issue 6): model-trained ZipLoRA/DuoLoRA, the DuoLoRA ablation,
and the weight-space strategies with calibrated input statistics.

``lora-merge bench quality`` adds these rows with :func:`extra_variants`;
``benchmarks/model_mode_toyworld.py`` measures them alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def toyworld_common(strategy: str = "duolora") -> dict[str, Any]:
    """Model-mode parameters for the bundled toy world and its reference images (ZipLoRA has no cycles,
    hence no cycle prompt)."""
    from ..toyworld import CONTENT_PROMPT, JOINT_PROMPT, STYLE_PROMPT

    common = {"mode": "model", "base": "toyworld", "content_images": "toyworld:content",
              "content_prompt": CONTENT_PROMPT, "style_images": "toyworld:style",
              "style_prompt": STYLE_PROMPT}  # fmt: skip
    if strategy == "duolora":
        common["cycle_prompt"] = JOINT_PROMPT
    return common


#: (label, strategy, extra params).  DuoLoRA's paper ablation: ZipRank alone → + priors → + Constyle
#: (= the full ``duolora (model)`` row).
MODEL_ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ziplora (model)", "ziplora", {}),
    ("duolora (model)", "duolora", {}),
    (
        "duolora (model, ZipRank only)",
        "duolora",
        {"lambda_prior": 0.0, "prior_init": False, "lambda_cycle": 0.0},
    ),
    ("duolora (model, ZipRank + priors)", "duolora", {"lambda_cycle": 0.0}),
    ("duolora (model, ZipRank + Constyle)", "duolora", {"lambda_prior": 0.0, "prior_init": False}),
    ("duolora (model, prior term, ones init)", "duolora", {"prior_init": False, "lambda_cycle": 0.0}),
)


def calibrate_toyworld(path: str | os.PathLike, force: bool = True, seed: int = 0) -> Path:
    """Input statistics of the toy world's LoRA'd layers on the bundled reference images."""
    from .. import load
    from ..toyworld import CONTENT_PROMPT, STYLE_PROMPT, bundled_loras
    from .calibrate import calibrate
    from .base_model import load_base_model

    loras = bundled_loras()
    base = load_base_model("toyworld")
    calibrate(base, path, content_images="toyworld:content", content_prompt=CONTENT_PROMPT,
              style_images="toyworld:style", style_prompt=STYLE_PROMPT,
              adapters=[load(loras["content"]), load(loras["style"])], samples=4, seed=seed,
              force=force)  # fmt: skip
    return Path(path)


def extra_variants(
    strategies: Sequence[str] | None,
    ablations: bool = True,
    calibrated: bool = True,
    stats_path: str | os.PathLike | None = None,
) -> list:
    """Rows for ``bench quality``: model mode (+ DuoLoRA's ablation) and weight space with statistics from
    ``calibrate`` (written to ``stats_path``, default a temporary folder).  Only for selected strategies
    that declare the needed parameters."""
    import tempfile

    from ..strategies import available_strategies
    from ..toyworld.quality import Variant

    avail = available_strategies()
    wanted = set(strategies) if strategies else {"ziplora", "duolora"}

    def declares(strat: str, param: str) -> bool:
        return strat in wanted and strat in avail and param in {p.name for p in avail[strat].params}

    rows = []
    for label, strat, extra in MODEL_ROWS:
        if declares(strat, "mode") and (ablations or not extra):
            rows.append(Variant(label, strat, {**toyworld_common(strat), **extra}))
    stat_rows = [s for s in ("ziplora", "duolora") if declares(s, "stats")] if calibrated else []
    if stat_rows:
        path = (
            Path(stats_path)
            if stats_path
            else Path(tempfile.mkdtemp(prefix="lm-stats-")) / "toyworld.safetensors"
        )
        calibrate_toyworld(path)
        for strat in stat_rows:
            rows.append(
                Variant(f"{strat} (calibrated stats)", strat, {"input_model": "stats", "stats": str(path)})
            )
    return rows
