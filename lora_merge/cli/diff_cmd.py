"""``lora-merge diff A B``: how far two adapters are apart, module by module."""
from __future__ import annotations

import math
import sys
from typing import Any

import click

from .common import (
    add_columns,
    allow_pickle_option,
    fmt_num,
    format_option,
    json_option,
    load_adapter,
    print_json,
    progress,
    stdout_console,
    strict_option,
)


@click.command("diff", short_help="Compare two adapters module by module (from the factors).")
@click.argument("a", type=click.Path(path_type=str))
@click.argument("b", type=click.Path(path_type=str))
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0), metavar="N",
              help="Rows per list: the N most different modules, blocks and tensors, the first N rank/alpha/shape "
                   "changes and one-sided modules (--json lists every row).")
@click.option("--fail-above", type=float, default=None, metavar="X",
              help="Exit 1 when the largest relative difference exceeds X, or a module exists on one side only "
                   "(default: never exit 1).")
@json_option
@format_option
@strict_option
@allow_pickle_option
def diff_cmd(a, b, top, fail_above, as_json, fmt, strict, allow_pickle):
    """Compare adapter B against adapter A (the reference), from the LoRA factors.

    Per module: ‖ΔW_A‖, ‖ΔW_B‖, relative difference ‖ΔW_A − ΔW_B‖/‖ΔW_A‖, cosine and norm ratio,
    and the overlap of the column spaces (mean squared cosine of the principal angles). Modules only
    in A or only in B, rank/alpha/shape changes, per-block aggregates and the most different modules.
    The same adapter written in two dialects diffs to ~0.
    """
    from lora_merge.analysis.diff import diff_adapters, exceeds, extra_tensors_differ

    ad_a = load_adapter(a, fmt=fmt, strict=strict, allow_pickle=allow_pickle)
    ad_b = load_adapter(b, fmt=fmt, strict=strict, allow_pickle=allow_pickle)
    result = diff_adapters(ad_a, ad_b, top=top, progress=progress("comparing modules"))
    failed = fail_above is not None and exceeds(result, fail_above)
    if extra_tensors_differ(result, fail_above if fail_above is not None else 0.0):
        e = result["extra_tensors"]
        click.echo(f"warning: non-LoRA tensors (modules_to_save) differ: {len(e['only_in_a'])} only in A, "
                   f"{len(e['only_in_b'])} only in B, max relative difference {fmt_num(e['max_rel_diff'])} "
                   "(not counted by --fail-above)", err=True)
    if as_json:
        out = dict(result)
        if fail_above is not None:
            out["fail_above"] = fail_above
            out["failed"] = failed
        print_json(out)
    else:
        render(result, top=top)
    if failed:
        click.echo(
            f"error: difference above {fail_above:g} (max relative difference {fmt_num(result['max_rel_diff'])}"
            f"{_one_sided_note(result)})",
            err=True,
        )
        sys.exit(1)


def _one_sided_note(r: dict[str, Any]) -> str:
    parts = []
    for side, label in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
        n = len(r[side]) + len(r["extra_tensors"][side])
        if n:
            parts.append(f"{n} {label}")
    return "; " + ", ".join(parts) if parts else ""


def _pct(x: float | None) -> str:
    return "-" if x is None else fmt_num(x, 3)


def _first(rows: list, top: int | None, key=None) -> list:
    """The rows a list shows: all (``top`` None), else ``top`` of them — the ``top`` largest by ``key`` when
    given, kept in their order."""
    if top is None or len(rows) <= top:
        return list(rows)
    if key is None:
        return rows[:top]
    keep = set(sorted(range(len(rows)), key=lambda i: -(key(rows[i]) or 0.0))[:top])
    return [row for i, row in enumerate(rows) if i in keep]


def _more(console, hidden: int, what: str) -> None:
    if hidden > 0:
        console.print(f"… and {hidden} more {what} (a larger --top shows them; --json lists every row)")


def render(r: dict[str, Any], console=None, *, top: int | None = None) -> None:
    """The diff for people; ``top`` limits every list to that many rows (None: all), each list that is cut
    says how many rows it left out."""
    from rich.panel import Panel
    from rich.table import Table

    console = console or stdout_console()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    for side in ("a", "b"):
        s = r[side]
        grid.add_row(side.upper(), f"{s['file']}  [dim]{s['dialect'] or '?'}, {s['architecture'] or 'unknown arch'}, "
                     f"{s['num_modules']} modules")
    t = r["total"]
    grid.add_row("common modules", str(r["num_common"]))
    grid.add_row("only in A / B", f"{len(r['only_in_a'])} / {len(r['only_in_b'])}")
    grid.add_row("rank/alpha/shape changes", str(len(r["changes"])))
    grid.add_row("total ‖ΔW_A‖ / ‖ΔW_B‖", f"{fmt_num(t['norm_a'])} / {fmt_num(t['norm_b'])}")
    grid.add_row("total relative diff", _pct(t["rel_diff"]))
    grid.add_row("total cosine", _pct(t["cosine"]))
    grid.add_row("max relative diff", f"[bold]{_pct(r['max_rel_diff'])}")
    console.print(Panel(grid, title="[bold]diff", expand=False))

    blocks = _first(r["blocks"], top, key=lambda b: b["rel_diff"])
    if blocks:
        tb = Table(title="per block" + ("" if len(blocks) == len(r["blocks"]) else f" (the {len(blocks)} most different)"),
                   title_justify="left")
        add_columns(tb, ("block", "modules", "‖ΔW_A‖", "‖ΔW_B‖", "rel. diff", "cosine", "norm ratio"),
                    name_width=max(len(b["block"]) for b in blocks))
        for b in blocks:
            tb.add_row(b["block"], str(b["modules"]), fmt_num(b["norm_a"]), fmt_num(b["norm_b"]),
                       _pct(b["rel_diff"]), _pct(b["cosine"]), _pct(b["norm_ratio"]))
        console.print(tb)
    _more(console, len(r["blocks"]) - len(blocks), "blocks")

    most = _first(r["top"], top)
    if most:
        tt = Table(title=f"{len(most)} most different modules", title_justify="left")
        add_columns(tt, ("module", "rank A/B", "‖ΔW_A‖", "‖ΔW_B‖", "rel. diff", "cosine", "norm ratio", "overlap"),
                    name_width=max(len(m["name"]) for m in most))
        for m in most:
            tt.add_row(m["name"], f"{m['rank_a']}/{m['rank_b']}", fmt_num(m["norm_a"]), fmt_num(m["norm_b"]),
                       _pct(m["rel_diff"]), _pct(m["cosine"]), _pct(m["norm_ratio"]), _pct(m["overlap"]))
        console.print(tt)
    _more(console, sum(1 for m in r["modules"] if m["comparable"]) - len(most), "common modules")

    changes = _first(r["changes"], top)
    if changes:
        tc = Table(title="rank / alpha / shape changes", title_justify="left")
        add_columns(tc, ("module", "changed", "A", "B"), name_width=max(len(c["name"]) for c in changes))
        for c in changes:
            tc.add_row(c["name"], ", ".join(c["changed"]),
                       f"r={c['rank_a']} α={fmt_num(c['alpha_a'])} {'×'.join(map(str, c['shape_a']))}",
                       f"r={c['rank_b']} α={fmt_num(c['alpha_b'])} {'×'.join(map(str, c['shape_b']))}")
        console.print(tc)
    _more(console, len(r["changes"]) - len(changes), "rank/alpha/shape changes")

    extra = r["extra_tensors"]
    for side, label in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
        rows = [(m["name"], fmt_num(m["norm"]), "LoRA module") for m in r[side]]
        rows += [(n, "-", "non-LoRA tensor") for n in extra[side]]
        shown = _first(rows, top)
        if shown:
            to = Table(title=label, title_justify="left")
            add_columns(to, ("name", "‖ΔW‖", "kind"), name_width=max(len(row[0]) for row in shown))
            for row in shown:
                to.add_row(*row)
            console.print(to)
        _more(console, len(rows) - len(shown), label)
    common = _first(extra["common"], top, key=lambda e: e["rel_diff"] if e["comparable"] else math.inf)
    if common:
        te = Table(title="non-LoRA tensors (modules_to_save)", title_justify="left")
        add_columns(te, ("name", "shape A", "shape B", "rel. diff"), name_width=max(len(e["name"]) for e in common))
        for e in common:
            te.add_row(e["name"], "×".join(map(str, e["shape_a"])), "×".join(map(str, e["shape_b"])),
                       _pct(e["rel_diff"]))
        console.print(te)
    _more(console, len(extra["common"]) - len(common), "non-LoRA tensors")
