"""``lora-merge inspect FILE...``: what an adapter file holds (header only unless ``--modules``)."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from .. import families
from .common import (
    add_columns,
    allow_pickle_option,
    fmt_num,
    format_option,
    human_bytes,
    json_option,
    load_adapter,
    print_json,
    progress,
    shorten,
    stdout_console,
    strict_option,
)


@click.command("inspect", short_help="Show what adapter files hold (reads only the header).")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--modules", "show_modules", is_flag=True,
              help="Add a per-module table with ‖ΔW‖_F and effective rank (loads the tensors).")
@click.option("--arch", "arch_name", default=None, metavar="ARCH",
              help=f"Force the architecture ({families.help_list(key='name')}; default: guessed from the names).")
@json_option
@format_option
@strict_option
@allow_pickle_option
def inspect_cmd(files, show_modules, arch_name, as_json, fmt, strict, allow_pickle):
    """Show dialect, architecture, modules per block, ranks/alphas, dtypes, size and metadata of
    each FILE (a .safetensors file or a PEFT adapter folder).

    Reads only the file header unless --modules is given. With several files, a bad file prints an
    error line and the others are still shown; the exit code is then non-zero.
    """
    from lora_merge.analysis.inspection import summarize
    from lora_merge.errors import LoraMergeError

    results: list[dict[str, Any]] = []
    first_error: LoraMergeError | None = None
    for f in files:
        try:
            adapter = load_adapter(f, fmt=fmt, strict=strict, allow_pickle=allow_pickle)
            prog = progress(f"norms of {f}") if show_modules else None
            summary = summarize(adapter, modules=show_modules, progress=prog, arch_name=arch_name)
        except LoraMergeError as exc:
            if len(files) == 1:
                raise
            click.echo(f"error: {exc}", err=True)
            first_error = first_error or exc
            results.append({"file": f, "error": str(exc)})
            continue
        if not as_json:
            if any("error" not in r for r in results):
                click.echo()  # a blank line between files
            render(summary)
        results.append(summary)
    if as_json:
        print_json(results[0] if len(files) == 1 else results)
    if first_error is not None:
        sys.exit(first_error.exit_code)


# ---- rendering for people ----

def layout_line(layout: str, note: str | None) -> str:
    """``native: BFL checkpoint names, …``: the layout and the family's note on it (the note alone when it
    already starts with the layout's name, the name alone without a note)."""
    if not note or note.strip().lower() == layout.lower():
        return layout
    if note.lower().startswith(layout.lower() + " "):
        return note
    return f"{layout}: {note}"


def _hist(summary: dict, key: str) -> str:
    h = summary[key]["histogram"]
    return ", ".join(f"{fmt_num(e['value'])}×{e['count']}" if len(h) > 1 else fmt_num(e["value"]) for e in h) or "-"


def render(s: dict[str, Any], console=None) -> None:
    from rich.panel import Panel
    from rich.table import Table

    console = console or stdout_console()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    dialect = s["dialect"] or "?"
    variant = s.get("dialect_variant")
    if variant and variant != dialect:  # "kohya (diffusers-names)", not "kohya (kohya-diffusers-names)"
        dialect += f" ({variant.removeprefix(dialect + '-')})"
    arch = s["architecture_name"] or "unknown"
    if s["architecture"] and s["architecture_name"] != s["architecture"]:
        arch += f" [{s['architecture']}]"
    grid.add_row("dialect", dialect)
    grid.add_row("architecture", arch)
    dit = s.get("dit")
    if dit:
        blocks = ", ".join(f"{k} {v}/{m}" for (k, v), m in zip(dit["blocks"].items(), dit["blocks_in_model"].values()))
        grid.add_row("blocks", blocks or "-")
        if dit.get("layout"):
            grid.add_row("layout", layout_line(dit["layout"], dit.get("layout_note")))
    grid.add_row("file size", human_bytes(s["file_size"]))
    grid.add_row("modules", f"{s['num_modules']}  ("
                 + ", ".join(f"{k} {v}" for k, v in s["components"].items()) + ")")
    grid.add_row("kinds", ", ".join(f"{k} {v}" for k, v in s["kinds"].items()) or "-")
    grid.add_row("parameters", f"{s['num_params']:,}")
    grid.add_row("rank", _hist(s, "ranks"))
    alpha = _hist(s, "alphas") + ("" if s["alphas"]["stored"] else "  (not stored: alpha = rank)")
    grid.add_row("alpha", alpha)
    grid.add_row("scale", _hist(s, "scales"))
    rules = s["scale_rules"]
    if rules and set(rules) != {"standard"}:
        grid.add_row("scale rule", ", ".join(f"{k} {v}" for k, v in rules.items()))
    grid.add_row("dtypes", ", ".join(f"{k} ({v} tensors)" for k, v in s["dtypes"].items()) or "-")
    if s["fan_in_fan_out"] is not None:
        grid.add_row("fan_in_fan_out", str(s["fan_in_fan_out"]))
    if s["modules_to_save"]:
        grid.add_row("modules_to_save", ", ".join(s["modules_to_save"]))
    if s["extra_tensors"]:
        grid.add_row("non-LoRA tensors", "\n".join(
            f"{e['name']} {tuple(e['shape'])} {e['dtype']}" for e in s["extra_tensors"]))
    if s.get("bias_deltas"):
        grid.add_row("bias deltas", f"bias deltas (diff_b): {s['bias_deltas']} modules (added to the layer's "
                     "bias at the adapter's strength, no LoRA scale)")
    if s["unparsed_keys"]:
        keys = s["unparsed_keys"]
        grid.add_row("[yellow]unparsed keys", f"[yellow]{len(keys)}: " + shorten(", ".join(keys), 200))
    console.print(Panel(grid, title=f"[bold]{s['file'] or 'adapter'}", expand=False))

    if s["blocks"]:
        t = Table(title="modules per block", title_justify="left")
        add_columns(t, ("block", "modules", "params", "ranks", "kinds"),
                    name_width=max(len(b["block"]) for b in s["blocks"]))
        for b in s["blocks"]:
            t.add_row(b["block"], str(b["modules"]), f"{b['params']:,}", ", ".join(map(str, b["ranks"])),
                      ", ".join(b["kinds"]))
        console.print(t)

    for key, label in (("ranks", "rank"), ("alphas", "alpha")):
        if s[key]["mixed"]:
            t = Table(title=f"{label} histogram", title_justify="left")
            t.add_column(label, justify="right")
            t.add_column("modules", justify="right")
            t.add_column("")
            top = max(e["count"] for e in s[key]["histogram"])
            for e in s[key]["histogram"]:
                t.add_row(fmt_num(e["value"]), str(e["count"]), "█" * max(1, round(30 * e["count"] / top)))
            console.print(t)

    _render_metadata(s, console)

    if "modules" in s:
        t = Table(title="modules", title_justify="left")
        add_columns(t, ("module", "kind", "shape", "rank", "alpha", "scale", "‖ΔW‖_F", "eff. rank", "dtype"),
                    name_width=max((len(m["name"]) for m in s["modules"]), default=0))
        for m in s["modules"]:
            t.add_row(m["name"], m["kind"], "×".join(map(str, m["shape"])), str(m["rank"]), fmt_num(m["alpha"]),
                      fmt_num(m["scale"]), fmt_num(m["norm"]), f"{m['effective_rank']:.2f}", m["dtype"])
        console.print(t)


#: metadata rows the human view shows (the rest are counted; ``--json`` has them all)
MAX_METADATA_ROWS = 60


def _render_metadata(s: dict[str, Any], console) -> None:
    from rich.table import Table

    md = s["metadata"]
    rows: list[tuple[str, str, str]] = []
    for k, v in md["kohya"].items():
        rows.append(("kohya", k, _show(v)))
    for k, v in md["modelspec"].items():
        rows.append(("modelspec", k, _show(v)))
    for k, v in md["other"].items():
        rows.append(("metadata", k, _show(v)))
    if s["config"]:
        from lora_merge.analysis.inspection import CONFIG_FIELDS

        for k in CONFIG_FIELDS:
            if k in s["config"] and s["config"][k] not in (None, {}, []):
                rows.append(("adapter config", k, _show(s["config"][k])))
    if rows:
        t = Table(title="metadata", title_justify="left")
        t.add_column("group", style="dim")
        t.add_column("key", style="cyan")
        t.add_column("value", overflow="fold")
        for group, key, value in rows[:MAX_METADATA_ROWS]:
            t.add_row(group, shorten(key, 80), value)
        if len(rows) > MAX_METADATA_ROWS:  # a header may hold 100,000 entries: summarise, do not render them
            t.add_row("…", f"{len(rows) - MAX_METADATA_ROWS:,} more entries", "(--json lists them all)")
        console.print(t)
    if md.get("recipe") is not None:
        from rich.panel import Panel
        from rich.syntax import Syntax

        text = json.dumps(md["recipe"], indent=2) if not isinstance(md["recipe"], str) else md["recipe"]
        console.print(Panel(Syntax(text, "json", word_wrap=True), title="merge recipe", expand=False))
    if md.get("recipe_error"):
        click.echo(f"warning: {s['file']}: {md['recipe_error']}", err=True)


def _show(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return shorten(json.dumps(v), 160)
    return shorten(fmt_num(v) if isinstance(v, (int, float)) else str(v), 160)
