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


def toyworld_common() -> dict[str, Any]:
    """Model-mode parameters for the bundled toy world and its reference images."""
    from ..toyworld import CONTENT_PROMPT, JOINT_PROMPT, STYLE_PROMPT

    return {"mode": "model", "base": "toyworld", "content_images": "toyworld:content",
            "content_prompt": CONTENT_PROMPT, "style_images": "toyworld:style", "style_prompt": STYLE_PROMPT,
            "cycle_prompt": JOINT_PROMPT}  # fmt: skip


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
)


def calibrate_toyworld(path: str | os.PathLike, force: bool = True, seed: int = 0) -> Path:
    """Input statistics of the toy world's LoRA'd layers on the bundled reference images."""
    from .. import load
    from ..toyworld import CONTENT_PROMPT, STYLE_PROMPT, bundled_loras
    from .calibrate import calibrate
    from .runtime import load_base_model

    loras = bundled_loras()
    base = load_base_model("toyworld")
    calibrate(base, path, content_images="toyworld:content", content_prompt=CONTENT_PROMPT,
              style_images="toyworld:style", style_prompt=STYLE_PROMPT,
              adapters=[load(loras["content"]), load(loras["style"])], samples=4, seed=seed,
              force=force)  # fmt: skip
    return Path(path)


def extra_variants(
    strategies: Sequence[str] | None, stats_path: str | os.PathLike | None, ablations: bool = True
) -> list:
    """Rows for ``bench quality``: model mode (+ ablations) and weight space with calibrated statistics.
    Only for strategies that are selected and declare the needed parameters."""
    from ..strategies import available_strategies
    from ..toyworld.quality import Variant

    avail = available_strategies()
    wanted = set(strategies) if strategies else {"ziplora", "duolora"}
    rows = []
    common = toyworld_common()
    for label, strat, extra in MODEL_ROWS:
        if strat not in wanted or strat not in avail or "mode" not in {p.name for p in avail[strat].params}:
            continue
        if extra and not ablations:
            continue
        rows.append(Variant(label, strat, {**common, **extra}))
    if stats_path is not None:
        made = False
        for strat in ("ziplora", "duolora"):
            if strat in wanted and strat in avail and "stats" in {p.name for p in avail[strat].params}:
                if not made:
                    calibrate_toyworld(stats_path)
                    made = True
                rows.append(
                    Variant(
                        f"{strat} (calibrated stats)",
                        strat,
                        {"input_model": "stats", "stats": os.fspath(stats_path)},
                    )
                )
    return rows
