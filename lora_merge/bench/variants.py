"""Every row of ``lora-merge bench quality``, in one place.

* :func:`demo_variants`: the few rows of ``lora-merge demo``;
* :func:`default_variants`: every registered strategy that merges two inputs, with its defaults and the
  ablations it offers (:data:`ABLATIONS`);
* :func:`priors_variants`: DuoLoRA with the paper's resolution rule next to priors measured on the toy
  world (docs/priors.md);
* :func:`model_mode_variants`: ZipLoRA/DuoLoRA trained through the toy world's UNet (:data:`MODEL_ROWS`,
  DuoLoRA's paper ablation) and the weight-space strategies with calibrated input statistics
  (docs/model-mode.md).  ``benchmarks/model_mode_toyworld.py`` measures these alone.

:func:`all_variants` puts them together in the order the benchmark runs them.  A row is only offered when
the registered strategy declares the parameters it sets.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import load
from ..errors import UsageError
from ..masks import Concept, References
from ..model_mode.base_model import load_base_model
from ..model_mode.calibrate import calibrate
from ..model_mode.measure_priors import measure_for_model
from ..priors import builtin_priors
from ..priors.measured import write_measured
from ..sampling_time import available_sampling_time
from ..strategies import available_strategies
from ..toyworld import world
from ..toyworld.model import ARCH
from ..toyworld.suite import Pair

#: the bundled default pair (sks + zkz), used when a function is given no pair
DEFAULT_PAIR = Pair(world.CONTENT_WORD, world.STYLE_WORD)


@dataclass
class Variant:
    """One benchmark row: a strategy with parameters and weights.  ``prepare`` writes a file the params
    name (measured priors, calibrated statistics); it runs only when the row is computed, not when it
    comes from the cache."""

    label: str
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    weights: tuple[float, float] = (1.0, 1.0)
    prepare: Callable[[], Any] | None = field(default=None, compare=False, repr=False)


def once(key: str, make: Callable[[], Any]) -> Callable[[], Any]:
    """``make`` run at most once per process for ``key`` (rows sharing one prepared file)."""
    def run() -> Any:
        if key not in _PREPARED:
            _PREPARED[key] = make()
        return _PREPARED[key]
    return run


_PREPARED: dict[str, Any] = {}


# ------------------------------------------------------------------------------------ strategies
#: ablations a strategy offers, keyed by strategy name: (label suffix, params).  Only rows whose
#: parameters the registered strategy actually declares are run.
ABLATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "duolora": [
        ("paper preset", {"preset": "paper"}),
        ("no prior", {"lambda_prior": 0.0}),
        ("no hinge", {"lambda_hinge": 0.0}),
        ("no cycle", {"lambda_cycle": 0.0}),
        ("prior init", {"prior_init": True}),
        ("strength free", {"strength": "free"}),
    ],
    "ziplora": [("no sim", {"lambda_sim": 0.0}), ("strength free", {"strength": "free"})],
}


def _declared(strategy: str) -> set[str]:
    avail = available_strategies()
    return {p.name for p in avail[strategy].params} if strategy in avail else set()


#: ``lora-merge demo``'s strategies when none are named (those registered; sampling-time mergers last)
DEMO_STRATEGIES = ("linear", "ziplora", "duolora", "np-lora", "k-lora", "timestep-split")


def demo_variants(strategies: str | Sequence[str] | None = None) -> list[Variant]:
    """``lora-merge demo``'s rows: linear at (1, 1) and (0.5, 0.5), then each other strategy with its
    defaults (``strategies``: names, or one comma-separated string)."""
    avail = known_strategies()
    if strategies:
        names = [s.strip() for s in strategies.split(",")] if isinstance(strategies, str) else list(strategies)
        names = [s for s in names if s]
        unknown = [s for s in names if s not in avail]
        if unknown:
            raise UsageError(f"unknown strategy {unknown[0]!r}; available: {', '.join(avail)}")
    else:
        names = [s for s in DEMO_STRATEGIES if s in avail]
    out = []
    for nm in names:
        if nm == "linear":
            out += [Variant("linear (1, 1)", "linear"), Variant("linear (0.5, 0.5)", "linear", weights=(0.5, 0.5))]
        else:
            out.append(Variant(nm, nm))
    return out


def default_variants(strategies: Sequence[str] | None = None, ablations: bool = True) -> list[Variant]:
    """Every registered strategy that can merge two inputs, with its defaults (+ its ablations)."""
    avail = available_strategies()
    names = list(strategies) if strategies else list(avail)
    out: list[Variant] = []
    for nm in names:
        if nm not in avail:
            raise UsageError(f"unknown strategy {nm!r}; available: {', '.join(avail)}")
        cls = avail[nm]
        if cls.min_inputs > 2 or (cls.max_inputs is not None and cls.max_inputs < 2):
            continue
        if nm == "linear":
            out.append(Variant("linear (1, 1)", "linear"))
            out.append(Variant("linear (0.5, 0.5)", "linear", weights=(0.5, 0.5)))
            continue
        out.append(Variant(nm, nm))
        if ablations:
            declared = {p.name for p in cls.params}
            for suffix, params in ABLATIONS.get(nm, []):
                if set(params) <= declared:
                    out.append(Variant(f"{nm} ({suffix})", nm, dict(params)))
    return out


# ------------------------------------------------------------------------------------ sampling time
def known_strategies() -> list[str]:
    """Every name a row can use: the registered merge strategies, then the sampling-time mergers."""
    return [*available_strategies(), *available_sampling_time()]


def sampling_variants(strategies: Sequence[str] | None = None) -> list[Variant]:
    """Sampling-time mergers (no file; :mod:`lora_merge.sampling_time`) with their defaults."""
    return [Variant(nm, nm) for nm in available_sampling_time() if not strategies or nm in strategies]


# ---------------------------------------------------------------------------------------- priors
def pair_adapters(pair: Pair | None = None):
    c, s = (pair or DEFAULT_PAIR).paths()
    return load(c), load(s)


def priors_path(seed: int = 0, pair: Pair | None = None) -> Path:
    pair = pair or DEFAULT_PAIR
    return Path(tempfile.gettempdir()) / f"lora-merge-toyworld-priors-{pair.subject}-{pair.style}-{seed}.json"


def toyworld_priors_file(seed: int = 0, pair: Pair | None = None) -> Path:
    """Measure the pair's LoRAs (default: the bundled sks + zkz) with the default settings and write the
    priors to :func:`priors_path` (rewritten on each call)."""
    pair = pair or DEFAULT_PAIR
    model = load_base_model(ARCH)
    _, result = measure_for_model(model, list(pair_adapters(pair)), None, None, None, None, seed)
    return write_measured(result, priors_path(seed, pair), force=True)


def priors_variants(strategies: Sequence[str] | None = None, pair: Pair | None = None,
                    model_mode: bool = True) -> list[Variant]:
    """DuoLoRA with the paper's resolution rule on the toy world's blocks (the SDXL rule: 4×4 → content,
    8×8 → style) next to DuoLoRA with priors measured on the toy world — in weight space, and in model
    mode when ``duolora`` offers ``--mode model`` (whose own ``duolora (model)`` row uses the rule)."""
    if "duolora" not in available_strategies() or (strategies and "duolora" not in strategies):
        return []
    declared = _declared("duolora")
    rows = []
    if ARCH in builtin_priors():
        rows.append(Variant("duolora (SDXL-rule priors)", "duolora", {"priors": ARCH}))
    path = priors_path(pair=pair)
    rows.append(Variant("duolora (measured priors)", "duolora", {"priors": str(path)},
                        prepare=once(str(path), lambda: toyworld_priors_file(pair=pair))))
    if model_mode and "mode" in declared:
        # the SDXL-rule model-mode row is model mode's own "duolora (model)" (priors auto = the rule)
        rows.append(Variant("duolora (model, measured priors)", "duolora",
                            {**toyworld_common("duolora", pair), "priors": "measure"}))
    return rows


# ------------------------------------------------------------------------------------ model mode
def toyworld_common(strategy: str = "duolora", pair: Pair | None = None) -> dict[str, Any]:
    """Model-mode parameters for a toy-world pair (default: sks + zkz) and its LoRAs' training images
    (ZipLoRA has no cycles, hence no cycle prompt)."""
    pair = pair or DEFAULT_PAIR
    style_caption = world.caption(pair.style_shape, pair.style)
    common = {"mode": "model", "base": ARCH, "content_images": f"{ARCH}:{pair.subject}",
              "content_prompt": pair.content_prompt, "style_images": f"{ARCH}:{pair.style}",
              "style_prompt": style_caption}  # fmt: skip
    if strategy == "duolora":
        common["cycle_prompt"] = pair.joint_prompt
    return common


#: (label, strategy, extra params).  DuoLoRA's paper ablation: ZipRank alone → + priors → + Constyle
#: (= the full ``duolora (model)`` row), and the paper's own configuration (``--preset paper``: prior init,
#: masks used as trained).
MODEL_ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ziplora (model)", "ziplora", {}),
    ("duolora (model)", "duolora", {}),
    ("duolora (model, paper preset)", "duolora", {"preset": "paper"}),
    ("duolora (model, ZipRank only)", "duolora", {"lambda_prior": 0.0, "lambda_cycle": 0.0}),
    ("duolora (model, ZipRank + priors)", "duolora", {"lambda_cycle": 0.0}),
)


def calibrate_toyworld(path: str | os.PathLike, force: bool = True, seed: int = 0, pair: Pair | None = None) -> Path:
    """Input statistics of the toy world's LoRA'd layers on the pair's training images."""
    pair = pair or DEFAULT_PAIR
    common = toyworld_common("ziplora", pair)
    base = load_base_model(ARCH)
    refs = References(Concept(common["content_images"], common["content_prompt"]),
                      Concept(common["style_images"], common["style_prompt"]))
    calibrate(base, path, refs, adapters=list(pair_adapters(pair)), samples=4, seed=seed, force=force)
    return Path(path)


def model_mode_variants(
    strategies: Sequence[str] | None,
    ablations: bool = True,
    calibrated: bool = True,
    stats_path: str | os.PathLike | None = None,
    pair: Pair | None = None,
) -> list[Variant]:
    """Model mode (+ DuoLoRA's ablation) and weight space with statistics from ``calibrate`` (written to
    ``stats_path``, default a file in the temp folder; written when a row first needs it).  Only for selected strategies that declare the needed
    parameters."""
    wanted = set(strategies) if strategies else {"ziplora", "duolora"}

    def declares(strat: str, param: str) -> bool:
        return strat in wanted and param in _declared(strat)

    rows = []
    for label, strat, extra in MODEL_ROWS:
        if declares(strat, "mode") and (ablations or not extra):
            rows.append(Variant(label, strat, {**toyworld_common(strat, pair), **extra}))
    stat_rows = [s for s in ("ziplora", "duolora") if declares(s, "stats")] if calibrated else []
    if stat_rows:
        p = pair or DEFAULT_PAIR
        path = Path(stats_path) if stats_path else (
            Path(tempfile.gettempdir()) / f"lora-merge-toyworld-stats-{p.subject}-{p.style}.safetensors")
        make = once(str(path), lambda: calibrate_toyworld(path, pair=pair))
        for strat in stat_rows:
            rows.append(Variant(f"{strat} (calibrated stats)", strat, {"input_model": "stats", "stats": str(path)},
                                prepare=make))
    return rows


# ------------------------------------------------------------------------------------------- all
def all_variants(strategies: Sequence[str] | None = None, ablations: bool = True, pair: Pair | None = None,
                 model_mode: bool = True) -> list[Variant]:
    """Every benchmark row of a pair: strategies (+ ablations), then the priors rows, then model mode and
    calibrated statistics (``model_mode=False``: the file-only rows; ``ablations=False``: each strategy
    with its defaults only, in each mode)."""
    file_strategies = [s for s in strategies if s in available_strategies()] if strategies else None
    return [
        *(default_variants(file_strategies, ablations=ablations) if file_strategies != [] else []),
        *sampling_variants(strategies),
        *(priors_variants(strategies, pair, model_mode=model_mode) if ablations else []),
        *(model_mode_variants(strategies, ablations=ablations, calibrated=ablations, pair=pair) if model_mode else []),
    ]
