"""``lora-merge merge``: a thin layer over :func:`lora_merge.engine.run_merge` (a recipe from the file,
the flags as overrides).

Strategy options are generated from the registry: every registered strategy's parameters become
options (``Param.option``; a closed set of values a :class:`click.Choice`), and each given option is checked
against the chosen strategy.  They are hidden from ``merge --help`` (a hundred of them), whose epilog lists
the strategies and points to ``lora-merge strategies NAME`` for each one's options.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from .. import families
from ..arch import sub_block_of
from ..engine.recipe import RECIPE_KEYS
from ..errors import LoraMergeError, UsageError
from ..strategies import available_strategies
from .common import (
    DTYPE_RULE,
    DialectChoice,
    allow_pickle_option,
    base_weights_option,
    check_file_path_text,
    default_dtype,
    dtype_option,
    fmt_num,
    output_option,
    print_json,
    shorten,
    stdout_console,
)

#: destination names of the fixed options (the recipe keys and the CLI-only ones); a strategy parameter
#: with one of these names is reachable only through --param NAME=VALUE or the recipe's params
_CORE = {*RECIPE_KEYS, "weight", "config", "as_json", "progress", "param", "allow_pickle", "dry_run", "repair"}


def _strategy_params() -> dict[str, list[tuple[str, Any]]]:
    by_name: dict[str, list[tuple[str, Any]]] = {}
    for cls in available_strategies().values():
        for p in cls.params:
            by_name.setdefault(p.name, []).append((cls.name, p))
    return by_name


def _strategy_options() -> list[click.Option]:
    """One hidden option per strategy parameter name (``lora-merge strategies NAME`` documents them)."""
    opts = []
    for name, owners in sorted(_strategy_params().items()):
        if name in _CORE:
            continue
        p = owners[0][1]
        helps: dict[str, list[str]] = {}  # strategies that share a parameter may describe it differently
        for cls_name, q in owners:
            choices = f" [{'|'.join(q.choices)}]" if q.choices else ""
            default = f" (default {q.default})" if q.default is not None else ""
            helps.setdefault(f"{q.help}{choices}{default}", []).append(cls_name)
        help_ = "; ".join(f"[{', '.join(sorted(who))}] {text}" for text, who in helps.items())
        if all(q.type is bool for _, q in owners):
            flag = p.option[2:]
            opts.append(click.Option([f"--{flag}/--no-{flag}", name], default=None, help=help_, hidden=True))
        elif all(q.choices for _, q in owners):  # a closed set: every strategy's values (each checks its own)
            values = list(dict.fromkeys(c for _, q in owners for c in q.choices))
            opts.append(click.Option([p.option, name], default=None, type=click.Choice(values), help=help_,
                                     hidden=True))
        else:
            metavar = (
                {"str": "TEXT"}.get(p.type.__name__, p.type.__name__.upper())
                if len({q.type for _, q in owners}) == 1
                else "VALUE"
            )
            opts.append(click.Option([p.option, name], default=None, type=str, metavar=metavar, help=help_,
                                     hidden=True))
    return opts


def _epilog() -> str:
    names = ", ".join(available_strategies())
    return (f"Strategies: {names}. Each one's own options (e.g. --density, --steps): `lora-merge "
            "strategies NAME`.")


def _split_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None


def _parse_param(spec: str) -> tuple[str, str]:
    k, sep, v = spec.partition("=")
    if not sep or not k.strip():
        raise UsageError(f"--param {spec!r}: expected NAME=VALUE")
    return k.strip().replace("-", "_"), v


def _refuse_sampling_time(strategy: str | None) -> None:
    """``-s k-lora``: one line saying why no file can hold it and where the method is."""
    from ..sampling_time import available_sampling_time

    key = (strategy or "").lower().replace("_", "").replace("-", "")
    for name, cls in available_sampling_time().items():
        if key == name.replace("-", ""):
            raise UsageError(
                f"{name!r} is a sampling-time method (it combines the LoRAs per layer at every denoising "
                f"step), so it cannot be saved as one LoRA file; use the Python API: {cls.api()} "
                "(docs/strategies.md)"
            )


@click.command("merge", context_settings={"help_option_names": ["-h", "--help"]}, epilog=_epilog())
@click.argument("inputs", nargs=-1, type=click.Path())
@output_option("Merged file (a folder for --to peft).")
@click.option("-s", "--strategy", default=None, metavar="NAME", help="Merge strategy (default: linear).")
@click.option("--weights", default=None, metavar="W1,W2,...", help="Per-input strengths (default: 1 each).")
@click.option("--weight", "weight", multiple=True, metavar="PATTERN=W",
              help="Scale layers matching PATTERN (glob, re:REGEX) by W or W1,W2,...; repeatable.")
@click.option("--rank", type=int, default=None, metavar="K",
              help="Re-factor to at most rank K (default: exact).")
@click.option("--full-rank", is_flag=True, default=False,
              help="ties/dare/magnitude-prune: store the dense result (default: rank = Σ input ranks).")
@click.option("--to", default=None, type=DialectChoice(writable=True),
              help="Output dialect (default: kohya for SD/SDXL LoRAs, else the first input's).")
@dtype_option(f"Stored dtype ({DTYPE_RULE}).", default=None)
@click.option("--device", default=None, metavar="DEVICE", help="cpu, cuda, cuda:1, ... (default: cpu).")
@click.option("--seed", type=int, default=None, metavar="N", help="Random seed (default: 0).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, metavar="N",
              help="Layers merged in parallel (default: all CPUs); same output.")
@click.option("--force", is_flag=True, default=False, help="Overwrite an existing output (not an input).")
@click.option("--dry-run", is_flag=True, default=False, help="Print the summary; write nothing (no -o).")
@click.option("--repair", is_flag=True, default=False,
              help="Rename a known broken key layout in the inputs first (as convert --repair).")
@click.option("--config", type=click.Path(), default=None, metavar="FILE",
              help="Recipe file (YAML, JSON or TOML); flags override it.")
@click.option("--keep-heads-from", type=int, default=None, metavar="N",
              help="Keep input N's PEFT modules_to_save when the inputs' differ (default: refused).")
@click.option("--report", type=click.Path(), default=None, metavar="FILE", help="Also write a per-layer JSON report.")
@click.option("--record-paths", is_flag=True, default=False,
              help="Record full input paths (default: names).")
@click.option("--arch", default=None, metavar="NAME",
              help=f"{families.help_list(key='name')} (default: guessed).")
@click.option("--allow-mixed-arch", is_flag=True, default=False,
              help="Merge inputs of different base models (default: refused).")
@click.option("--param", "param", multiple=True, metavar="NAME=VALUE", help="Any strategy parameter; repeatable.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@base_weights_option("The base model's weights file (not a folder): DoRA inputs merge exactly.")
@allow_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(**kw: Any) -> None:
    """Merge the LoRA adapters INPUTS (files or PEFT folders; input 1 = content, input 2 = style for the
    strategies that care)."""
    from ..engine import MergeOptions, Recipe, read_recipe_file, run_merge
    from ..progress import progress_bar
    from ..strategies import get_strategy

    _refuse_sampling_time(kw["strategy"])
    data = read_recipe_file(kw["config"]) if kw["config"] else {}
    recipe = Recipe.from_dict(data, kw["config"] and Path(kw["config"]))
    if kw["inputs"]:
        recipe = recipe.with_overrides(inputs=kw["inputs"], sha256=())
    if not recipe.inputs:
        raise UsageError("no inputs: give input files or a --config recipe with 'inputs'")
    strategy = kw["strategy"] or recipe.strategy
    _refuse_sampling_time(strategy)
    cls = get_strategy(strategy)
    given: dict[str, Any] = {}
    for name in _strategy_params():
        if name not in _CORE and kw.get(name) is not None:
            given[name] = kw[name]
    for spec in kw["param"]:
        k, v = _parse_param(spec)
        given[k] = v
    takes = {p.name for p in cls.params}
    for name in given:
        if name not in takes:
            opt = "--" + name.replace("_", "-")
            raise UsageError(
                f"option {opt} does not apply to strategy {strategy!r}"
                + (
                    f" (it takes: {', '.join('--' + t.replace('_', '-') for t in sorted(takes))})"
                    if takes
                    else " (it takes no options)"
                )
            )
    recipe = recipe.with_overrides(
        strategy=strategy, params=given, output=kw["output"], rank=kw["rank"], to=kw["to"], dtype=kw["dtype"],
        seed=kw["seed"], keep_heads_from=kw["keep_heads_from"], report=kw["report"], arch=kw["arch"],
        weights=_split_weights(kw["weights"]), layer_weights=list(kw["weight"]) or None,
        force=kw["force"] or None, record_paths=kw["record_paths"] or None,
        allow_mixed_arch=kw["allow_mixed_arch"] or None, full_rank=kw["full_rank"] or None,
        base_weights=kw["base_weights"],
    )  # fmt: skip
    if kw["dry_run"]:  # with_overrides leaves a None as it is: clear the outputs explicitly
        recipe = dataclasses.replace(recipe, output=None, report=None)
    elif recipe.output is None:
        raise UsageError("no output: give -o/--output FILE (or --dry-run to merge without writing anything)")
    else:
        check_file_path_text(kw["output"] or str(data.get("output") or ""), recipe.to)
        check_file_path_text(kw["report"] or str(data.get("report") or ""), None)  # a report is a file
    options = MergeOptions.from_dict(data).with_overrides(device=kw["device"], threads=kw["threads"],
                                                          allow_pickle=kw["allow_pickle"] or None)
    if kw["repair"]:  # the engine reads paths as they are: read them here, repaired, and pass the adapters
        recipe.verify_inputs()  # (the recorded sha256 are of the files; the engine checks only paths)
        recipe = recipe.with_overrides(inputs=_read_inputs(recipe, options, repair=True), sha256=recipe.sha256)
    if recipe.dtype is None:
        recipe = recipe.with_overrides(dtype=_default_dtype(recipe, options))
    show = kw["progress"] if kw["progress"] is not None else (sys.stderr.isatty() and not kw["as_json"])
    with progress_bar("merging", enabled=show) as bar:
        result = run_merge(recipe, options.with_overrides(progress=bar))
    _print(result, kw["as_json"])
    if kw["dry_run"]:
        click.echo("dry run: nothing written", err=True)
        return
    from ..formats.clients import loader_note

    note = loader_note(result.adapter, result.report["recipe"]["to"] or "")
    if note and result.output is not None:
        click.echo(f"note: {note}", err=True)


def _read_inputs(recipe, options, *, repair: bool = False, quiet: bool = False) -> list:
    """The recipe's inputs as adapters, read as the engine reads them (``repair``: broken layouts renamed;
    ``quiet``: their warnings not shown, for a second look at inputs the engine reads again)."""
    import warnings

    import lora_merge

    from ..adapter import Adapter

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        return [x if isinstance(x, Adapter) else
                lora_merge.load(x, allow_pickle=options.allow_pickle, base_weights=recipe.base_weights,
                                **({"repair": True} if repair else {}))
                for x in recipe.inputs]  # fmt: skip


def _default_dtype(recipe, options) -> str:
    """The dtype a merge without ``--dtype`` stores (:func:`lora_merge.cli.common.default_dtype`; the same
    rule as ``convert``), from the inputs' headers.  An input that cannot be read gives fp32 here; the
    engine then reports why, in its own order of checks."""
    try:
        return default_dtype(_read_inputs(recipe, options, quiet=True))
    except LoraMergeError:
        return "fp32"


def summary_of(result) -> dict[str, Any]:
    """What ``merge --json`` prints: the output, the resolved recipe's strategy and parameters, sizes, the
    strategy's report, and how a dense or truncated result was stored."""
    ranks = [m.rank for m in result.adapter]
    summary = {
        "output": str(result.output) if result.output else None,
        "strategy": result.report["recipe"]["strategy"],
        "params": result.report["recipe"]["params"],
        "dtype": result.report["recipe"].get("dtype"),
        "modules": len(ranks),
        "rank_min": min(ranks),
        "rank_max": max(ranks),
        "extra_tensors": len(result.adapter.extra_tensors),
        "num_params": result.adapter.num_params,
        "strategy_report": result.report["strategy"],
    }
    for key in ("dense", "truncation"):  # how a dense result was stored / what a rank truncation lost
        if result.report.get(key):
            summary[key] = result.report[key]
    return summary


def _print(result, as_json: bool) -> None:
    summary = summary_of(result)
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for k, v in human_rows(summary):
        t.add_row(k, v)
    console = stdout_console()
    console.print(t)
    if "blocks" in (result.report.get("strategy") or {}):
        console.print(mask_table(result.report))


#: the longest a value of the human summary gets (``--json`` has everything)
_HUMAN_WIDTH = 200


def human_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The human summary of a merge: one short line per fact (the strategy's report and the storage of a
    dense result summarised; ``--json`` has them in full)."""
    rows = [("output", str(summary["output"]))]
    rows.append(("strategy", summary["strategy"]))
    cls = available_strategies().get(summary["strategy"])
    defaults = {q.name: q.default for q in cls.params} if cls is not None else {}
    changed = {k: v for k, v in summary["params"].items() if v is not None and (k not in defaults or v != defaults[k])}
    if summary["params"]:
        text = ", ".join(f"{k}={v}" for k, v in changed.items())
        rows.append(("params", shorten(text, _HUMAN_WIDTH) + (" (the rest: defaults)" if text else "defaults")))
    if summary.get("dtype"):
        rows.append(("dtype", str(summary["dtype"])))
    lo, hi = summary["rank_min"], summary["rank_max"]
    rows.append(("modules", f"{summary['modules']} (rank {lo}{'' if lo == hi else f'–{hi}'})"))
    if summary["extra_tensors"]:
        rows.append(("extra tensors", str(summary["extra_tensors"])))
    rows.append(("parameters", f"{summary['num_params']:,}"))
    rows += _strategy_rows(summary.get("strategy_report") or {})
    for key, label in (("dense", "dense result"), ("truncation", "rank truncation")):
        d = summary.get(key)
        if d:
            ranks = f"{d['rank_min']}" if d["rank_min"] == d["rank_max"] else f"{d['rank_min']}–{d['rank_max']}"
            text = (f"{d['modules']} modules at rank {ranks} ({d['rank_rule']}); relative error "
                    f"{fmt_num(d['rel_error_overall'], 3)} overall, {fmt_num(d['rel_error_max'], 3)} at worst "
                    f"({shorten(d['worst_module'], 60)})")
            rows.append((label, text))
    return rows


def _loss_total(x: Any) -> float | None:
    if isinstance(x, dict):
        x = x.get("total")
    return float(x) if isinstance(x, (int, float)) else None


def _strategy_rows(rep: dict[str, Any]) -> list[tuple[str, str]]:
    """A strategy's report in a few lines: a mask strategy's (ziplora, duolora) layers, mean masks and
    loss before → after; any other strategy's scalar entries, the rest counted."""
    if not rep:
        return []
    if "blocks" not in rep:
        scalars = [f"{k}={fmt_num(v)}" for k, v in rep.items() if k != "strategy" and not isinstance(v, (dict, list))]
        nested = [k for k, v in rep.items() if isinstance(v, (dict, list))]
        text = ", ".join(scalars) + (f"{'; ' if scalars else ''}{', '.join(nested)}: see --json" if nested else "")
        return [("report", shorten(text, _HUMAN_WIDTH))] if text else []
    how = "trained through the model" if rep.get("model_mode") else f"input model {rep.get('input_model', '?')}"
    masks = f"{rep.get('layers', 0)} layers, {rep.get('trainable_values', 0):,} trainable values, {how}"
    rows = [("masks", masks)]
    blocks = rep.get("blocks") or {}
    n = sum(b["layers"] for b in blocks.values())
    if n:
        mc = sum(b["mask_content"] * b["layers"] for b in blocks.values()) / n
        ms = sum(b["mask_style"] * b["layers"] for b in blocks.values()) / n
        rows.append(("mean masks", f"content {mc:.3f}, style {ms:.3f}"))
    loss = rep.get("loss_mean") or {}
    before, after = _loss_total(loss.get("init")), _loss_total(loss.get("final"))
    model = rep.get("model_mode") or {}
    if model:  # trained through the model: its objective before and after
        before, after = _loss_total(model.get("objective_before")), _loss_total(model.get("objective_after"))
    if before is not None and after is not None:
        what = "model objective" if model else "mean per layer"
        rows.append(("loss", f"{fmt_num(before)} → {fmt_num(after)} (before → after, {what})"))
    if isinstance(rep.get("priors"), dict):
        roles = rep["priors"].get("layers_by_role") or {}
        src = rep["priors"].get("source") or rep["priors"].get("spec")
        rows.append(("priors", f"{src}" + (f" ({', '.join(f'{k} {v}' for k, v in roles.items())})" if roles else "")))
    return rows


def mask_table(report: dict[str, Any]):
    """A mask strategy's table (ziplora, duolora): per-block mean masks and retention, built from the merge
    report (its totals are rows of the summary above it)."""
    from rich.table import Table

    strat = report.get("strategy") or {}
    layers = report.get("layers") or {}
    t = Table(title=f"{strat.get('strategy', '?')}: mean masks per block")
    for col in ("block", "layers", "role", "mask content", "mask style", "retention content", "retention style"):
        t.add_column(col, justify="left" if col in ("block", "role") else "right", no_wrap=col == "block")
    acc: dict[str, dict[str, list]] = {}
    for name, info in layers.items():
        a = acc.setdefault(sub_block_of(name) or "other", {"role": set(), "rc": [], "rs": []})
        a["role"].add(info.get("role", "-"))
        ret = info.get("retention") or {}
        if ret.get("content") is not None:
            a["rc"].append(ret["content"])
        if ret.get("style") is not None:
            a["rs"].append(ret["style"])

    def mean(x):
        return f"{sum(x) / len(x):.4f}" if x else "-"

    for blk, b in (strat.get("blocks") or {}).items():
        a = acc.get(blk, {"role": {"-"}, "rc": [], "rs": []})
        t.add_row(blk, str(b["layers"]), ",".join(sorted(a["role"])), f"{b['mask_content']:.3f}",
                  f"{b['mask_style']:.3f}", mean(a["rc"]), mean(a["rs"]))  # fmt: skip
    t.caption = "masks in <output>.masks.safetensors"
    return t


merge.params.extend(_strategy_options())
