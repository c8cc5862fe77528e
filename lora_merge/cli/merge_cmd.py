"""``lora-merge merge``: a thin layer over :func:`lora_merge.engine.run_merge` (a recipe from the file,
the flags as overrides).

Strategy options are generated from the registry: every registered strategy's parameters become
options (``Param.option``), and each given option is checked against the chosen strategy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .. import families
from ..arch import sub_block_of
from ..engine.recipe import RECIPE_KEYS
from ..errors import UsageError
from ..strategies import available_strategies
from .common import allow_pickle_option, check_file_path_text, print_json, stdout_console

#: destination names of the fixed options (the recipe keys and the CLI-only ones); a strategy parameter
#: with one of these names is reachable only through --param NAME=VALUE or the recipe's params
_CORE = {*RECIPE_KEYS, "weight", "config", "as_json", "progress", "param", "allow_pickle", "dry_run"}


def _strategy_params() -> dict[str, list[tuple[str, Any]]]:
    by_name: dict[str, list[tuple[str, Any]]] = {}
    for cls in available_strategies().values():
        for p in cls.params:
            by_name.setdefault(p.name, []).append((cls.name, p))
    return by_name


def _strategy_options() -> list[click.Option]:
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
            opts.append(click.Option([f"--{flag}/--no-{flag}", name], default=None, help=help_))
        else:
            metavar = (
                {"str": "TEXT"}.get(p.type.__name__, p.type.__name__.upper())
                if len({q.type for _, q in owners}) == 1
                else "VALUE"
            )
            opts.append(click.Option([p.option, name], default=None, type=str, metavar=metavar, help=help_))
    return opts


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


@click.command("merge", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="Output file (PEFT: a folder).")
@click.option(
    "-s", "--strategy", default=None, help="Merge strategy (default linear); see `lora-merge strategies`."
)
@click.option("--weights", default=None, metavar="W1,W2,...", help="Per-input weights (inference strength).")
@click.option(
    "--weight",
    "weight",
    multiple=True,
    metavar="PATTERN=W[,W2,...]",
    help="Multiply the weights of layers whose name contains PATTERN (whole dot-separated components, glob "
    "* ? [..] allowed, 're:' for a regex); one W for all inputs or one per input. "
    "Repeatable; matches multiply.",
)
@click.option(
    "--rank",
    type=int,
    default=None,
    help="Re-factor every layer to at most rank K from its factors (Gram matrices + a small eigenproblem; "
    "never a dense SVD).",
)
@click.option(
    "--full-rank", is_flag=True, default=False,
    help="ties, dare, magnitude-prune: store the dense result exactly (every direction; ~100x larger files). "
    "Default: re-factored to the sum of the input ranks, the relative error reported.",
)
@click.option(
    "--to", default=None,
    help="Output dialect: kohya, diffusers or peft (default: kohya for SD/SDXL UNet and text-encoder LoRAs, "
    "which diffusers, ComfyUI, A1111/Forge and kohya all load; else the first input's).",
)
@click.option(
    "--dtype", default=None, help="Output dtype: fp32 (default), fp16 or bf16; math is always fp32."
)
@click.option("--device", default=None, help="cpu or cuda (default cpu).")
@click.option("--seed", type=int, default=None, help="Seed for every random choice (default 0).")
@click.option(
    "--threads",
    type=click.IntRange(1, 1024),
    default=None,
    help="Layers finished side by side on the CPU (default: every CPU available); the output is the same "
    "for any value.",
)
@click.option("--force", is_flag=True, default=False, help="Overwrite an existing output (never an input).")
@click.option("--dry-run", is_flag=True, default=False,
              help="Merge and print the summary without writing anything (no -o needed).")
@click.option(
    "--config", type=click.Path(), default=None, help="Recipe file (YAML, JSON or TOML); flags override it."
)
@click.option(
    "--keep-heads-from",
    type=int,
    default=None,
    metavar="N",
    help="Keep input N's (1-based) PEFT modules_to_save tensors when the inputs' differ.",
)
@click.option("--report", type=click.Path(), default=None, help="Write a per-layer JSON report here.")
@click.option(
    "--record-paths", is_flag=True, default=False,
    help="Record the inputs' full paths in the merged file's recipe (default: file names and sha256 only).",
)
@click.option("--arch", default=None, help=f"Override the guessed architecture ({families.help_list(key='name')}).")
@click.option(
    "--allow-mixed-arch", is_flag=True, default=False,
    help="Merge inputs whose detected base models differ (refused by default; for a misdetected input).",
)
@click.option("--param", "param", multiple=True, metavar="NAME=VALUE", help="Any strategy parameter by name.")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal)."
)
@click.option(
    "--base-weights", type=click.Path(exists=True, dir_okay=False), default=None, metavar="FILE",
    help="The base model's .safetensors: DoRA inputs merge exactly (recorded with its sha256).",
)
@allow_pickle_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(**kw: Any) -> None:
    """Merge the LoRA adapters INPUTS (files or PEFT folders; input 1 = content, input 2 = style for the
    strategies that care).  Strategy options apply only to the strategy that declares them."""
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
    if kw["dry_run"]:
        recipe = recipe.with_overrides(output=None, report=None)
    elif recipe.output is None:
        raise UsageError("no output: give -o/--output FILE (or --dry-run to merge without writing anything)")
    else:
        check_file_path_text(kw["output"] or str(data.get("output") or ""), recipe.to)
    options = MergeOptions.from_dict(data).with_overrides(device=kw["device"], threads=kw["threads"],
                                                          allow_pickle=kw["allow_pickle"] or None)
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


def _print(result, as_json: bool) -> None:
    ranks = [m.rank for m in result.adapter]
    summary = {
        "output": str(result.output) if result.output else None,
        "strategy": result.report["recipe"]["strategy"],
        "params": result.report["recipe"]["params"],
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
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for k, v in summary.items():
        if k == "strategy_report" and not v:
            continue
        t.add_row(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    console = stdout_console()
    console.print(t)
    if "blocks" in (result.report.get("strategy") or {}):
        console.print(mask_table(result.report))


def mask_table(report: dict[str, Any]):
    """A mask strategy's table (ziplora, duolora): per-block mean masks and retention, trainable values,
    losses, built from the merge report."""
    from rich.table import Table

    strat = report.get("strategy") or {}
    layers = report.get("layers") or {}
    t = Table(title=f"{strat.get('strategy', '?')}: {strat.get('trainable_values', 0):,} trainable values, "
                    f"input model {strat.get('input_model', '?')}")  # fmt: skip
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
    loss = strat.get("loss_mean") or {}
    if "init" in loss and "final" in loss:
        t.caption = (f"mean loss per layer: {loss['init']['total']:.4g} (init) → {loss['final']['total']:.4g} "
                     f"(final); masks in <output>.masks.safetensors")  # fmt: skip
    return t


merge.params.extend(_strategy_options())
