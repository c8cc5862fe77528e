"""``lora-merge demo``: merge one content–style pair of the toy-world suite and show the result.

The terminal table and the picture are drawn from the same rows (:func:`demo_table`): the row's label and
what it is, its prompt, and the judge's cells (:data:`SCORE_COLUMNS`).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from .common import json_option, print_json, stderr_console, stdout_console, threads_option

#: the suite pair the demo merges by default
DEMO_PAIR = "ohwx+mrv"
DEFAULT_OUTPUT = Path("lora-merge-demo.png")

#: what each held-out concept of the toy world looks like (lora_merge.toyworld.world draws them); the rest
#: of a concept's description is read from the world itself (a subject's photo style, a style's one
#: reference shape)
SUBJECT_LOOKS: dict[str, str] = {"sks": "a thick ring", "ohwx": "an hourglass",
                                 "tqk": "a square with a notch in its top-right corner"}
STYLE_LOOKS: dict[str, str] = {"zkz": "purple/lime diagonal stripes",
                               "bfk": "navy with orange stripes, on a cream background",
                               "mrv": "orange/brown coarse checks with a white outline"}

#: the judge's cells of every row, in the terminal table and in the picture
SCORE_COLUMNS: tuple[str, ...] = ("content", "style", "both", "merge (s)", "judge saw")
#: a cell with nothing to report (a score the prompt does not ask for, no merged file)
NONE = "-"


def describe_concept(word: str) -> str:
    """One line on what a held-out toy-world concept is and what its LoRA was trained on."""
    from ..toyworld import world
    from ..toyworld.train import CONTENT_IMAGES

    if word in world.SUBJECTS:
        return (f"{word} = {SUBJECT_LOOKS.get(word, 'a held-out shape')}, learned from {CONTENT_IMAGES} photos "
                f"in {world.SUBJECTS[word]} style")
    if word in world.STYLE_CONCEPTS:
        return (f"{word} = {STYLE_LOOKS.get(word, 'a held-out style')}, learned from one image of a "
                f"{world.STYLE_CONCEPTS[word]}")
    raise UsageError(f"{word!r} is not a held-out toy-world concept")


@dataclass(frozen=True)
class DemoRow:
    """One row of the demo's table and picture: ``cells`` line up with :data:`SCORE_COLUMNS`."""

    label: str
    detail: str | None
    prompt: str
    cells: tuple[str, ...]
    best: bool = False


def _pct(x: float | None) -> str:
    return NONE if x is None else f"{100 * x:.0f}%"


def _seen(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (counts or {}).items()) or NONE


def demo_table(rows: Sequence[dict[str, Any]], best: dict[str, Any] | None = None) -> list[DemoRow]:
    """The demo's rows (label, what it is, prompt, the judge's cells), from the judged rows of
    :func:`demo`: the one table that the terminal prints and the picture draws."""
    out = []
    for r in rows:
        ms = r.get("merge_seconds")
        cells = (_pct(r.get("content_acc")), _pct(r.get("style_acc")), _pct(r.get("joint_acc")),
                 NONE if ms is None else f"{ms:.2f}",
                 f"shape: {_seen(r.get('shapes_seen'))}\nstyle: {_seen(r.get('styles_seen'))}")
        out.append(DemoRow(r["label"], r.get("detail"), r["prompt"], cells, best is not None and r is best))
    return out


def demo_strategies_help() -> str:
    """``--strategies``'s help, listing the rows :func:`lora_merge.bench.variants.demo_variants` runs."""
    from ..bench.variants import demo_variants

    labels = [v.label for v in demo_variants(None)]
    return f"Comma-separated strategies.  Default ({len(labels)} rows): {'; '.join(labels)}."


class _StrategiesOption(click.Option):
    """``--strategies``, whose help is generated from the list the demo runs when help is shown (so
    importing the command does not import the strategies)."""

    def get_help_record(self, ctx: click.Context):
        self.help = demo_strategies_help()
        return super().get_help_record(ctx)


def picture_text(pair, n: int, table: Sequence[DemoRow], max_cols: int = 16) -> dict[str, Any]:
    """The picture's title, the lines under it, the header over the images and the footer."""
    best = next((r for r in table if r.best), None)
    shown = min(n, max_cols)
    title = (f"lora-merge demo: a content LoRA ({pair.subject}) and a style LoRA ({pair.style}), alone and "
             f"merged {len(table) - 2} ways")
    prompt = (f'Every merge row draws the prompt "{pair.joint_prompt}": the {pair.subject} shape in the '
              f"{pair.style} style.  Every row uses the same {n} seeds.")
    judge = (f"A judge network classifies the shape and the style of every image: content, style and both are "
             f"the shares of the row's images it sees as {pair.subject}, in {pair.style} style, and both; "
             f"judge saw lists its verdicts.")
    footer = [f"\"{NONE}\": not asked by the row's prompt, or no merged file (a sampling-time merger)."]
    if best:
        footer.insert(0, f"BEST (green frame): the merge judged both {pair.subject} and {pair.style} most often "
                         f"({best.label}, {best.cells[2]}).")
    return {"title": title, "subtitle": [prompt, judge], "footer": footer,
            "images_header": f"{n} samples" if shown == n else f"the first {shown} of {n} samples"}


def grid_rows(table: Sequence[DemoRow], images: Sequence[Any]):
    """:class:`lora_merge.bench.grid.GridRow` s of the table's rows with their images."""
    from ..bench.grid import GridRow

    return [GridRow(r.label, im, notes=[*([r.detail] if r.detail else []), f'prompt: "{r.prompt}"'],
                    cells=r.cells, best=r.best) for r, im in zip(table, images)]


def render_demo(pair, n: int, table: Sequence[DemoRow], images: Sequence[Any], max_cols: int = 16):
    """The demo's picture (a :class:`lora_merge.bench.grid.Grid`) of ``table``'s rows and their images."""
    from ..bench.grid import Column, render_grid

    text = picture_text(pair, n, table, max_cols)
    columns = [Column(h, wrap=h == "judge saw", width=200) for h in SCORE_COLUMNS]
    return render_grid(grid_rows(table, images), title=text["title"], subtitle=text["subtitle"],
                       images_header=text["images_header"], columns=columns, footer=text["footer"],
                       max_cols=max_cols, label_width=250)


def print_table(pair, n: int, table: Sequence[DemoRow]) -> None:
    from rich.table import Table
    from rich.text import Text

    con = stdout_console()
    t = Table(title=f"toy-world demo {pair.name}: {n} images per row, judged (content = {pair.subject}, "
                    f"style = {pair.style})")
    for col in ("row", "prompt", *SCORE_COLUMNS):
        t.add_column(col, justify="left" if col in ("row", "prompt", "judge saw") else "right")
    for r in table:
        label = Text(r.label + ("  ← best" if r.best else ""))
        if r.detail:
            label.append("\n" + r.detail, style="dim")
        t.add_row(label, r.prompt, *r.cells, style="bold green" if r.best else None)
    con.print(t)


@click.command("demo")
@click.option("--n", "n", default=8, show_default=True, type=click.IntRange(1, 4096),
              help="Images per row (each judged).")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_OUTPUT,
              show_default=True, help="The picture (PNG): every row's images, the judge's scores, the best row "
                                      "marked.")
@click.option("--out", "old_out", type=click.Path(dir_okay=False, path_type=Path), default=None, hidden=True,
              help="Deprecated name of -o/--output.")
@click.option("--strategies", default=None, cls=_StrategiesOption, help="Comma-separated strategies.")
@click.option("--pair", default=DEMO_PAIR, show_default=True,
              help="The suite pair to merge (subject+style; `lora-merge bench quality --help` lists the suite).")
@click.option("--seed", default=0, show_default=True, help="Sampling and merge seed.")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@threads_option
@json_option
@click.pass_context
def demo(ctx: click.Context, n: int, out: Path, old_out: Path | None, strategies: str | None, pair: str, seed: int,
         force: bool, as_json: bool) -> None:
    """Merge a content LoRA and a style LoRA of the toy-world suite (default: the ohwx hourglass, trained
    DreamBooth-style on 6 striped photos, and the mrv coarse-check style, trained StyleDrop-style on one
    image of a square) with a few strategies, draw the joint prompt for each, and judge every image.

    Writes a picture (rows: content LoRA alone, style LoRA alone, then one row per strategy; beside each
    row the judge's scores, the best merge framed) and prints the same table.  Everything runs on CPU from
    the weights shipped with the package.
    """
    if old_out is not None:
        if ctx.get_parameter_source("out") is not click.core.ParameterSource.DEFAULT and out != old_out:
            raise UsageError("-o/--output and --out (its old name) name different files")
        click.echo("warning: --out is deprecated; use -o/--output", err=True)
        out = old_out
    from ..bench.grid import write_png
    from ..bench.quality import evaluate, run_variant
    from ..bench.variants import demo_variants
    from ..files import check_output_folder, refuse_existing
    from ..sampling_time import available_sampling_time
    from ..toyworld.suite import pairs, style_check_prompts

    chosen = pairs(pair)
    if len(chosen) != 1:
        raise UsageError(f"--pair: name one pair, not {pair!r}")
    p = chosen[0]
    refuse_existing(out, force)
    check_output_folder(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"{out}: -o/--output must be a .png file")
    variants = demo_variants(strategies)
    content, style = p.paths()
    style_prompt = style_check_prompts(p.style)[0]
    err = stderr_console()
    t0 = time.perf_counter()
    rows = []
    with err.status("sampling the LoRAs alone…"):
        c = evaluate(content, n=n, seed=seed, prompt=p.content_prompt, return_images=True)
        s = evaluate(style, n=n, seed=seed, prompt=style_prompt, return_images=True)
        rows.append({"label": "content LoRA alone", "detail": describe_concept(p.subject),
                     "prompt": p.content_prompt, **c})
        rows.append({"label": "style LoRA alone",
                     "detail": f"{describe_concept(p.style)}; prompted with a shape it never saw",
                     "prompt": style_prompt, **s})
    sampling_time = set(available_sampling_time())
    for v in variants:
        with err.status(f"merging with {v.label} and sampling…"):
            r = run_variant(v, content, style, n=n, seed=seed, prompt=p.joint_prompt)
        detail = "merged while sampling (no merged file)" if v.strategy in sampling_time else None
        rows.append({"prompt": p.joint_prompt, "detail": detail, **r})
    merged = [r for r in rows if r.get("strategy")]
    best = max(merged, key=lambda r: (r["joint_acc"] or 0.0), default=None)
    table = demo_table(rows, best)
    grid = render_demo(p, n, table, [r["images"] for r in rows])
    path = write_png(grid.image, out)
    elapsed = time.perf_counter() - t0
    for r in rows:
        r.pop("images", None)
    if as_json:
        print_json({"grid": str(path), "pair": p.name, "n": n, "seed": seed, "seconds": elapsed,
                    "best": best["label"] if best else None, "columns": list(SCORE_COLUMNS),
                    "table": [{"label": t.label, "cells": list(t.cells)} for t in table], "rows": rows})
        return
    print_table(p, n, table)
    con = stdout_console()
    if best:
        con.print(f"best merge on this pair: {best['label']} ({_pct(best['joint_acc'])} judged both subject and "
                  f"style)")
    con.print(f"picture: {path}  ({elapsed:.0f} s)")
