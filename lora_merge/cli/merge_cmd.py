"""``lora-merge merge``: a thin layer over :func:`lora_merge.merge`.

Strategy options are generated from the registry: every registered strategy's parameters become
options (``Param.option``), and each given option is checked against the chosen strategy.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..errors import UsageError
from ..recipe import RECIPE_KEYS
from ..strategies import available_strategies

#: destination names of the fixed options (the recipe keys and the CLI-only ones); a strategy parameter
#: with one of these names is reachable only through --param NAME=VALUE or the recipe's params
_CORE = {*RECIPE_KEYS, "weight", "config", "as_json", "progress", "param"}


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
    "--to", default=None, help="Output dialect: kohya, diffusers or peft (default: the first input's)."
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
@click.option("--arch", default=None, help="Override the guessed architecture (sdxl, sd1, ...).")
@click.option("--param", "param", multiple=True, metavar="NAME=VALUE", help="Any strategy parameter by name.")
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge(**kw: Any) -> None:
    """Merge the LoRA adapters INPUTS (files or PEFT folders; input 1 = content, input 2 = style for the
    strategies that care).  Strategy options apply only to the strategy that declares them."""
    from ..engine import merge as do_merge
    from ..recipe import load_recipe, verify_inputs
    from ..strategies import get_strategy

    recipe = load_recipe(kw["config"]) if kw["config"] else {}
    inputs = list(kw["inputs"]) or verify_inputs(recipe.get("inputs", []))
    if not inputs:
        raise UsageError("no inputs: give input files or a --config recipe with 'inputs'")
    output = kw["output"] or recipe.get("output")
    strategy = kw["strategy"] or recipe.get("strategy") or "linear"
    cls = get_strategy(strategy)

    params = dict(recipe.get("params", {}))
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
    params.update(given)

    layer_weights = list(recipe.get("layer_weights", [])) + list(kw["weight"])
    keep = kw["keep_heads_from"] if kw["keep_heads_from"] is not None else recipe.get("keep_heads_from")
    progress = kw["progress"] if kw["progress"] is not None else (sys.stderr.isatty() and not kw["as_json"])
    result = do_merge(
        inputs,
        output,
        strategy=strategy,
        weights=_split_weights(kw["weights"]) if kw["weights"] is not None else recipe.get("weights"),
        layer_weights=layer_weights,
        params=params,
        rank=kw["rank"] if kw["rank"] is not None else recipe.get("rank"),
        to=kw["to"] or recipe.get("to"),
        dtype=kw["dtype"] or recipe.get("dtype"),
        device=kw["device"] or recipe.get("device") or "cpu",
        seed=kw["seed"] if kw["seed"] is not None else int(recipe.get("seed", 0)),
        force=kw["force"] or bool(recipe.get("force", False)),
        keep_extra_from=None if keep is None else int(keep) - 1,
        progress=progress,
        report_path=kw["report"] or recipe.get("report"),
        arch=kw["arch"] or recipe.get("arch"),
        threads=kw["threads"] if kw["threads"] is not None else recipe.get("threads"),
    )
    _print(result, kw["as_json"])


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
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for k, v in summary.items():
        if k == "strategy_report" and not v:
            continue
        t.add_row(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    Console().print(t)
    # additive hook: a strategy may render its own table from the report (ziplora/duolora: masks, retention)
    from ..strategies import get_strategy

    render = getattr(get_strategy(result.report["recipe"]["strategy"]), "render_report", None)
    if callable(render):
        extra = render(result.report)
        if extra is not None:
            Console().print(extra)


merge.params.extend(_strategy_options())
