"""Running a merge: :func:`run_merge` (a :class:`Recipe` and :class:`MergeOptions`) and :func:`merge`,
the keyword-argument face of the same thing.

The steps, each in its own module: check every output path before any work (``files``), load the
inputs, line them up (:mod:`.plan`), let the strategy prepare on the plan, run the layer loop
(:mod:`.layers`), then write the adapter, the strategy's sidecars and the report (:mod:`.output`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..adapter import Adapter
from ..errors import UsageError
from ..files import refuse_existing
from ..api import load, save
from ..progress import progress_bar
from ..strategies import MergeStrategy
from ..strategies.base import call_prepare
from .layers import LayerRun, run_layers, worker_count
from .output import InputHasher, adapter_metadata, check_sidecars, write_report, write_sidecars
from .plan import Plan
from .recipe import MergeOptions, Recipe

__all__ = ["MergeResult", "merge", "run_merge"]


@dataclass
class MergeResult:
    adapter: Adapter
    report: dict[str, Any]
    output: Path | None = None
    warnings: list[str] = field(default_factory=list)


def _paths(inputs: Sequence[Any]) -> list[Path | None]:
    return [Path(x.source) if isinstance(x, Adapter) and x.source else None if isinstance(x, Adapter)
            else Path(x) for x in inputs]  # fmt: skip


def _check_outputs(recipe: Recipe, strategy: MergeStrategy, inputs: list[Path | None], force: bool) -> None:
    if recipe.output is not None:
        out = Path(recipe.output)
        refuse_existing(out, force, inputs)
        check_sidecars(strategy, out, force, inputs)
    if recipe.report is not None:
        refuse_existing(recipe.report, force, inputs)


def run_merge(recipe: Recipe, options: MergeOptions | None = None, *,
              strategy: MergeStrategy | None = None) -> MergeResult:
    """Merge as ``recipe`` says; ``strategy`` is an already configured strategy object (else the recipe's
    ``strategy`` and ``params`` build one).  Nothing is written when ``recipe.output`` is None."""
    options = options or MergeOptions()
    strat = strategy if strategy is not None else recipe.build_strategy()
    recipe.validate(strat)
    dev = options.torch_device()
    recipe.verify_inputs()
    _check_outputs(recipe, strat, _paths(recipe.inputs), recipe.force)  # fail before any work
    adapters = [x if isinstance(x, Adapter) else load(x) for x in recipe.inputs]
    paths = _paths([ad if isinstance(x, Adapter) else x for x, ad in zip(recipe.inputs, adapters)])
    _check_outputs(recipe, strat, paths, recipe.force)
    names = [os.fspath(p) if p is not None else ad.display_name for p, ad in zip(paths, adapters)]
    hasher = InputHasher(paths, worker_count(None, torch.device("cpu")))
    try:
        return _merge_loaded(recipe, options, strat, adapters, paths, names, dev, hasher)
    finally:
        hasher.close()


def _merge_loaded(recipe: Recipe, options: MergeOptions, strat: MergeStrategy, adapters: list[Adapter],
                  paths: list[Path | None], names: list[str], dev: torch.device, hasher: InputHasher) -> MergeResult:
    plan = Plan(adapters, names, weights=recipe.resolved_weights(), layer_weights=recipe.resolved_layer_weights(),
                arch=recipe.arch, seed=recipe.seed, device=dev, rank=recipe.rank)  # fmt: skip
    heads = plan.merged_heads(recipe.keep_heads_from)
    call_prepare(strat, plan, plan.legacy_context())
    run = LayerRun(out_dtype=recipe.out_dtype, threads=options.threads, progress=options.progress,
                   with_retention=recipe.report is not None and len(adapters) == 2)
    modules, layer_info = run_layers(plan, strat, run)
    first = adapters[0]
    merged = Adapter(modules=modules, extra_tensors=heads, dialect=first.dialect,
                     config=dict(first.config) if first.config else None)
    recorded = recipe.to_metadata(names, hasher.results(), [ad.dialect for ad in adapters], strat.config,
                                  arch=plan.arch, to=recipe.to or first.dialect, version=__version__)
    merged.metadata = adapter_metadata(merged, recorded, names)
    report = {"recipe": recorded, "layers": layer_info, "strategy": strat.report()}
    written = None
    if recipe.output is not None:
        written = Path(save(merged, recipe.output, to=recipe.to, dtype=recipe.out_dtype, force=recipe.force))
        merged.source = written
        write_sidecars(strat, written, recorded, recipe.force, paths)
    if recipe.report is not None:
        write_report(Path(recipe.report), report)
    return MergeResult(adapter=merged, report=report, output=written)


def merge(
    inputs: Sequence[str | os.PathLike | Adapter],
    output: str | os.PathLike | None = None,
    *,
    strategy: str | MergeStrategy = "linear",
    weights: Sequence[float] | None = None,
    layer_weights: Sequence[tuple[str, float | Sequence[float]] | str] = (),
    params: dict[str, Any] | None = None,
    rank: int | None = None,
    to: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    keep_heads_from: int | None = None,
    progress: bool | Any = False,
    report_path: str | os.PathLike | None = None,
    arch: str | None = None,
    threads: int | None = None,
    keep_extra_from: int | None = None,
) -> MergeResult:
    """Merge LoRA adapters (paths or in-memory :class:`Adapter`) with a strategy.

    ``weights`` are per-input inference strengths; ``layer_weights`` are ``(pattern, w)`` or
    ``(pattern, [w_1, …, w_n])`` pairs (or ``'PATTERN=W'`` strings) that multiply the weights of the
    layers the pattern matches (see :mod:`lora_merge.patterns`).  ``rank=None`` keeps the result's exact
    rank; ``rank=K`` re-factors every layer to at most ``K`` from its factors.  Tensors are merged in
    fp32 on ``device`` and stored as ``dtype`` (fp32 when None).  ``keep_heads_from`` is the 1-based
    input whose PEFT ``modules_to_save`` tensors are kept when the inputs' differ (``keep_extra_from``,
    0-based, is its deprecated spelling).  Nothing is written when ``output`` is None.  ``threads``
    layers are finished side by side on the CPU, each with one torch thread (default: every CPU this
    process may use); the result is the same for any value.  ``progress`` is True for a progress bar
    on stderr or a ``(done, total, layer)`` callback.
    """
    if keep_extra_from is not None:
        warnings.warn("merge(keep_extra_from=i) is deprecated; use keep_heads_from=i + 1 (1-based, as the "
                      "CLI's --keep-heads-from)", DeprecationWarning, stacklevel=2)  # fmt: skip
        if keep_heads_from is None:
            keep_heads_from = int(keep_extra_from) + 1
    if isinstance(strategy, MergeStrategy):
        if params:
            raise UsageError("pass strategy parameters to the strategy object, not params=")
        strat, name = strategy, strategy.name
    else:
        strat, name = None, str(strategy)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    recipe = Recipe(
        inputs=tuple(inputs), output=None if output is None else os.fspath(output), strategy=name,
        params=dict(params or {}), weights=None if weights is None else tuple(weights),
        rank=rank, to=to, dtype=dtype, seed=int(seed), force=bool(force), keep_heads_from=keep_heads_from,
        arch=arch, report=None if report_path is None else os.fspath(report_path),
    ).with_overrides(layer_weights=list(layer_weights))  # fmt: skip
    if callable(progress):
        return run_merge(recipe, MergeOptions(device=device, threads=threads, progress=progress), strategy=strat)
    with progress_bar("merging", enabled=bool(progress)) as bar:
        return run_merge(recipe, MergeOptions(device=device, threads=threads, progress=bar), strategy=strat)
