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
from ..errors import OutputExistsError, UsageError
from ..files import check_output_folder, dtype_name, make_dirs, output_transaction, refuse_existing
from ..formats.api import load, save
from ..formats.bias import merged_bias
from ..formats.clients import check_writable, default_output_dialect, one_alpha, read_only_default_note
from ..formats.layout import align_inputs
from ..formats.registry import get_dialect
from ..progress import ProgressFn, progress_bar
from ..strategies import MergeStrategy
from ..strategies.base import call_prepare
from .layers import LayerRun, run_layers, worker_count
from .output import InputHasher, adapter_metadata, sidecar_path, write_report, write_sidecars
from .plan import Plan
from .recipe import MergeOptions, Recipe, recorded_name

__all__ = ["DenseRefactorWarning", "MergeResult", "dense_summary", "merge", "run_merge"]


class DenseRefactorWarning(UserWarning):
    """A dense strategy's result (ties, dare, magnitude-prune) was re-factored to a lower rank by default."""


#: a strategy that truncates rank (``svd --rank K`` / ``--energy``) warns when a module loses more than
#: this fraction of ‖ΔW‖_F
TRUNCATION_WARN = 0.01


def dense_summary(layer_info: dict[str, dict[str, Any]], prefix: str = "dense") -> dict[str, Any] | None:
    """How the dense results were stored: the rank rule, the ranks, and the relative Frobenius error
    ``‖ΔW − B A‖/‖ΔW‖`` of the worst module and over all modules together; None without dense layers.
    ``prefix="truncation"`` summarizes the rank a strategy truncated itself (its layers' ``truncation_*``
    info) the same way."""
    dense = {n: i for n, i in layer_info.items() if f"{prefix}_rel_error" in i}
    if not dense:
        return None
    worst = max(dense, key=lambda n: dense[n][f"{prefix}_rel_error"])
    num = sum((i[f"{prefix}_rel_error"] * i[f"{prefix}_norm"]) ** 2 for i in dense.values())
    den = sum(i[f"{prefix}_norm"] ** 2 for i in dense.values())
    ranks = [i["rank"] for i in dense.values()]
    return {
        "rank_rule": next(iter(dense.values()))[f"{prefix}_rank_rule"],
        "modules": len(dense),
        "rank_min": min(ranks),
        "rank_max": max(ranks),
        "rel_error_overall": (num / den) ** 0.5 if den > 0 else 0.0,
        "rel_error_max": dense[worst][f"{prefix}_rel_error"],
        "worst_module": worst,
    }


@dataclass
class MergeResult:
    adapter: Adapter
    report: dict[str, Any]
    output: Path | None = None
    warnings: list[str] = field(default_factory=list)


def _paths(inputs: Sequence[Any]) -> list[Path | None]:
    return [Path(x.source) if isinstance(x, Adapter) and x.source else None if isinstance(x, Adapter)
            else Path(x) for x in inputs]  # fmt: skip


def _output_files(recipe: Recipe, dialect: str | None) -> tuple[list[Path], bool]:
    """The files the adapter output will be (a folder dialect's files inside its folder) and whether the
    output is a folder; ``dialect`` None: not known yet (before the inputs are read)."""
    out = Path(recipe.output)
    d = get_dialect(dialect, what="output format") if dialect is not None else None
    if d is None and out.is_dir():
        return [], True  # a folder dialect's folder, presumably: its files are checked once it is known
    if d is not None and d.folder_files:
        if out.suffix == ".safetensors":
            raise UsageError(f"{out}: a {d.label} adapter is a folder; give a folder path, not a .safetensors "
                             "file (or pick another format with --to)")
        if out.exists() and not out.is_dir():
            raise OutputExistsError("output exists and is not a folder", out)
        return [out / n for n in d.folder_files], True
    return [out], False


def _check_outputs(recipe: Recipe, strategy: MergeStrategy, inputs: list[Path | None], force: bool,
                   dialect: str | None = None) -> None:
    """Every path the merge will write: not an input (even with ``force``), not an existing file
    (without it), not one another, in a folder that exists and is writable — before any work."""
    targets: list[tuple[Path, bool]] = []  # (path, in a folder the writer creates)
    if recipe.output is not None:
        out = Path(recipe.output)
        files, folder = _output_files(recipe, dialect)
        targets += [(f, folder) for f in files]
        if folder:
            refuse_existing(out, True, inputs, folder=True)
        targets += [(sidecar_path(out, suffix), False) for suffix in getattr(strategy, "sidecar_suffixes", ())]
    if recipe.report is not None:
        targets.append((Path(recipe.report), False))
    seen: dict[Path, Path] = {}
    for path, _ in targets:
        key = path.resolve()
        if key in seen:
            raise UsageError(f"{path}: also the path of another output of this merge ({seen[key]})")
        seen[key] = path
    if recipe.output is not None and recipe.report is not None and Path(recipe.report).resolve() == Path(
            recipe.output).resolve():  # a folder output and a report onto that folder
        raise UsageError(f"{recipe.report}: --report is the merged output's path")
    for path, _ in targets:
        refuse_existing(path, True, inputs)
    for path, creates in targets:
        refuse_existing(path, force)
        check_output_folder(path, create=creates)


def run_merge(recipe: Recipe, options: MergeOptions | None = None, *,
              strategy: MergeStrategy | None = None) -> MergeResult:
    """Merge as ``recipe`` says; ``strategy`` is an already configured strategy object (else the recipe's
    ``strategy`` and ``params`` build one).  Nothing is written when ``recipe.output`` is None."""
    options = options or MergeOptions()
    strat = strategy if strategy is not None else recipe.build_strategy()
    recipe.validate(strat)
    dev = options.torch_device()
    recipe.verify_inputs()
    # fail before any work: the paths first (with the output dialect once the inputs' headers are read)
    _check_outputs(recipe, strat, _paths(recipe.inputs), recipe.force, recipe.to)
    adapters = [x if isinstance(x, Adapter) else load(x, allow_pickle=options.allow_pickle,
                                                      base_weights=recipe.base_weights) for x in recipe.inputs]
    paths = _paths([ad if isinstance(x, Adapter) else x for x, ad in zip(recipe.inputs, adapters)])
    _check_outputs(recipe, strat, paths, recipe.force, recipe.to or default_output_dialect(adapters))
    check_writable(adapters, recipe.to or default_output_dialect(adapters))
    names = [os.fspath(p) if p is not None else ad.display_name for p, ad in zip(paths, adapters)]
    dora = recipe.base_weights is not None and any(getattr(m, "lycoris_type", None) == "DoRA"
                                                   for ad in adapters for m in ad)  # fmt: skip
    hasher = InputHasher([*paths, Path(recipe.base_weights) if dora else None],  # type: ignore[arg-type]
                         worker_count(None, torch.device("cpu")))
    try:
        with output_transaction():  # the adapter, its sidecars and the report appear together, or none
            return _merge_loaded(recipe, options, strat, adapters, paths, names, dev, hasher)
    finally:
        hasher.close()


def _merge_loaded(recipe: Recipe, options: MergeOptions, strat: MergeStrategy, adapters: list[Adapter],
                  paths: list[Path | None], names: list[str], dev: torch.device, hasher: InputHasher) -> MergeResult:
    out_to = recipe.to or default_output_dialect(adapters)  # kohya for SD/SDXL LoRAs: every loader reads it
    note = None if recipe.to else read_only_default_note(adapters)
    if note:
        warnings.warn(note, UserWarning, stacklevel=3)
    adapters = align_inputs(adapters, out_to, recipe.arch, recipe.rank)  # one DiT layout; LyCORIS needs --rank
    plan = Plan(adapters, names, weights=recipe.resolved_weights(), layer_weights=recipe.resolved_layer_weights(),
                arch=recipe.arch, seed=recipe.seed, device=dev, rank=recipe.rank,
                allow_mixed_arch=recipe.allow_mixed_arch, allow_pickle=options.allow_pickle)  # fmt: skip
    heads = plan.merged_heads(recipe.keep_heads_from)
    call_prepare(strat, plan, plan.legacy_context())
    run = LayerRun(out_dtype=recipe.out_dtype, threads=options.threads, progress=options.progress,
                   with_retention=recipe.report is not None and len(adapters) == 2, full_rank=recipe.full_rank)
    modules, layer_info = run_layers(plan, strat, run)
    merged_bias(modules, plan.adapters, plan.coeffs)  # diff_b: Σ w_i·b_i, whatever the strategy
    dense = dense_summary(layer_info)
    if dense is not None and dense["rank_rule"] == "sum" and dense["rel_error_max"] > 1e-6:
        ranks = (f"{dense['rank_min']}" if dense["rank_min"] == dense["rank_max"]
                 else f"{dense['rank_min']}–{dense['rank_max']}")
        warnings.warn(DenseRefactorWarning(
            f"{strat.name}: the merged ΔW of each layer is dense (full rank); stored at the sum of the inputs' "
            f"ranks (rank {ranks}), relative error ‖ΔW−BA‖/‖ΔW‖ "
            f"{dense['rel_error_overall']:.3g} over all modules, {dense['rel_error_max']:.3g} at worst "
            f"({dense['worst_module']}); --rank K to choose the rank, --full-rank to keep every direction "
            "(exact, but every layer at full rank: hundreds of MB for an SD UNet)"), stacklevel=3)  # fmt: skip
    truncated = dense_summary(layer_info, "truncation")
    for lost in (truncated, dense if dense is not None and dense["rank_rule"] == "rank" else None):
        if lost is not None and lost["rel_error_max"] > TRUNCATION_WARN:
            rule = lost["rank_rule"] if lost is truncated else f"--rank {recipe.rank}"
            warnings.warn(DenseRefactorWarning(
                f"{strat.name}: {rule} lost part of ΔW: relative error ‖ΔW−BA‖/‖ΔW‖ "
                f"{lost['rel_error_overall']:.3g} over all modules, {lost['rel_error_max']:.3g} at worst "
                f"({lost['worst_module']}); a higher --rank keeps more"), stacklevel=3)  # fmt: skip
    first = adapters[0]
    merged = Adapter(modules=modules, extra_tensors=heads, dialect=first.dialect,
                     config=dict(first.config) if first.config else None)
    if out_to == "kohya":  # one alpha for all modules: diffusers mis-scales kohya files with mixed alphas
        merged = one_alpha(merged)
    shown = [os.fspath(p) if recipe.record_paths else recorded_name(p) if p is not None else nm
             for p, nm in zip(paths, names)]  # fmt: skip
    *hashes, bw_hash = hasher.results()
    bw = None
    if recipe.base_weights is not None and bw_hash is not None:  # the DoRA inputs' base model changed the result
        bw = {"path": recipe.base_weights if recipe.record_paths else recorded_name(recipe.base_weights),
              "sha256": bw_hash}
    recorded = recipe.to_metadata(shown, hashes, [ad.dialect for ad in adapters], strat.config,
                                  arch=plan.arch, to=out_to, version=__version__, base_weights=bw)
    merged.metadata = adapter_metadata(merged, recorded, shown)
    alphas = {m.alpha for m in merged}
    if len(alphas) == 1 and merged.metadata.get("ss_network_dim") == "Dynamic":
        merged.metadata["ss_network_alpha"] = f"{alphas.pop():g}"
    report = {"recipe": recorded, "layers": layer_info, "strategy": strat.report()}
    if dense is not None:
        report["dense"] = dense
    if truncated is not None:
        report["truncation"] = truncated
    written = None
    if recipe.output is not None:
        if _output_files(recipe, out_to)[1]:
            make_dirs(recipe.output)  # a folder output: removed again if the merge stops before the end
        written = Path(save(merged, recipe.output, to=out_to, dtype=recipe.out_dtype, force=recipe.force))
        merged.source = written
        write_sidecars(strat, written, recorded, recipe.force, paths)
    if recipe.report is not None:
        write_report(Path(recipe.report), report)
    return MergeResult(adapter=merged, report=report, output=written)


#: ``merge()`` keywords that are :class:`Recipe` settings under another name, or :class:`MergeOptions`
_RENAMED = {"report_path": "report"}
_OPTIONS = ("device", "threads", "allow_pickle")


def merge(
    inputs: Sequence[str | os.PathLike | Adapter],
    output: str | os.PathLike | None = None,
    *,
    strategy: str | MergeStrategy = "linear",
    params: dict[str, Any] | None = None,
    progress: bool | ProgressFn = False,
    **settings: Any,
) -> MergeResult:
    """Merge LoRA adapters (paths or in-memory :class:`Adapter`) with a strategy (a name and its
    ``params``, or a configured :class:`MergeStrategy`).  Nothing is written when ``output`` is None.

    The other keywords are the :class:`Recipe` settings and the :class:`MergeOptions`:

    - ``weights``: per-input inference strengths; ``layer_weights``: ``(pattern, w)`` or
      ``(pattern, [w_1, …, w_n])`` pairs (or ``'PATTERN=W'`` strings) that multiply the weights of the
      layers the pattern matches (see :mod:`lora_merge.patterns`);
    - ``rank``: None keeps the result's exact rank, ``K`` re-factors every layer to at most K from its
      factors; ``to``: output dialect; ``dtype``: stored dtype (fp32 when None; the math is fp32);
    - ``seed``, ``force``, ``arch``, ``report_path`` (a per-layer JSON report);
    - ``keep_heads_from``: the 1-based input whose PEFT ``modules_to_save`` tensors are kept when the
      inputs' differ (``keep_extra_from``, 0-based, is its deprecated spelling);
    - ``device`` and ``threads``: layers are finished side by side on the CPU, each with one torch
      thread (default: every CPU this process may use); the result is the same for any value;
    - ``allow_pickle``: also read ``.bin``/``.pt``/``.ckpt`` inputs (``torch.load(weights_only=True)``);
    - ``base_weights``: the base model's ``.safetensors``; DoRA inputs become exact dense updates
      (recorded in the merged file with its sha256).

    ``progress`` is True for a progress bar on stderr, or a ``(done, total, layer)`` callback.
    """
    if "keep_extra_from" in settings:
        old = settings.pop("keep_extra_from")
        warnings.warn("merge(keep_extra_from=i) is deprecated; use keep_heads_from=i + 1 (1-based, as the "
                      "CLI's --keep-heads-from)", DeprecationWarning, stacklevel=2)  # fmt: skip
        if old is not None and settings.get("keep_heads_from") is None:
            settings["keep_heads_from"] = int(old) + 1
    options = MergeOptions(**{k: settings.pop(k) for k in _OPTIONS if settings.get(k) is not None})
    settings = {_RENAMED.get(k, k): v for k, v in settings.items()}
    if isinstance(strategy, MergeStrategy):
        if params:
            raise UsageError("pass strategy parameters to the strategy object, not params=")
        strat, settings["strategy"] = strategy, strategy.name
    else:
        strat, settings["strategy"] = None, str(strategy)
    if isinstance(settings.get("dtype"), torch.dtype):
        settings["dtype"] = dtype_name(settings["dtype"])
    for key in ("output", "report"):
        if settings.get(key) is not None:
            settings[key] = os.fspath(settings[key])
    recipe = Recipe(inputs=tuple(inputs), params=dict(params or {})).with_overrides(
        output=output if output is None else os.fspath(output), **settings
    )
    if callable(progress):
        return run_merge(recipe, options.with_overrides(progress=progress), strategy=strat)
    with progress_bar("merging", enabled=bool(progress)) as bar:
        return run_merge(recipe, options.with_overrides(progress=bar), strategy=strat)
