"""``lora-merge demo``: merge the bundled toy-world content and style LoRAs and show the result."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import UsageError
from .common import json_option, print_json, stderr_console, stdout_console, threads_option


@click.command("demo")
@click.option("--n", "n", default=8, show_default=True, type=click.IntRange(1, 4096),
              help="Images per row (each judged).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("lora-merge-demo.png"),
              show_default=True, help="The comparison grid PNG.")
@click.option("--strategies", default=None,
              help="Comma-separated strategies (default: linear at (1,1) and (0.5,0.5), plus ziplora and "
                   "duolora when available).")
@click.option("--seed", default=0, show_default=True, help="Sampling and merge seed.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@threads_option
@json_option
def demo(n: int, out: Path, strategies: str | None, seed: int, force: bool, as_json: bool) -> None:
    """Merge the bundled toy-world content LoRA ("a sks object": a ring) and style LoRA ("in zkz style":
    purple/lime diagonal stripes) with a few strategies, draw "a sks object in zkz style" for each, and
    judge every image (content = a ring, style = zkz).

    Writes a grid PNG (rows: content LoRA alone, style LoRA alone, then one row per strategy) and prints
    the judge's table.  Everything runs on CPU from the weights shipped with the package.
    """
    from ..bench.quality import evaluate, pct, run_variant, save_grid
    from ..bench.variants import demo_variants
    from ..files import check_output_folder, refuse_existing
    from ..toyworld import CONTENT_PROMPT, JOINT_PROMPT, STYLE_PROMPT, bundled_loras

    refuse_existing(out, force)
    check_output_folder(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"{out}: --out must be a .png file")
    variants = demo_variants(strategies)
    loras = bundled_loras()
    err = stderr_console()
    t0 = time.perf_counter()
    rows = []
    with err.status("sampling the LoRAs alone…"):
        c = evaluate(loras["content"], n=n, seed=seed, prompt=CONTENT_PROMPT, return_images=True)
        s = evaluate(loras["style"], n=n, seed=seed, prompt=STYLE_PROMPT, return_images=True)
        rows.append({"label": "content LoRA alone", "prompt": CONTENT_PROMPT, **c})
        rows.append({"label": "style LoRA alone", "prompt": STYLE_PROMPT, **s})
    for v in variants:
        with err.status(f"merging with {v.label} and sampling…"):
            r = run_variant(v, loras["content"], loras["style"], n=n, seed=seed)
        rows.append({"prompt": JOINT_PROMPT, **r})
    grid = save_grid([(f"{r['label']}", r["images"]) for r in rows], out)
    elapsed = time.perf_counter() - t0
    for r in rows:
        r.pop("images", None)
    if as_json:
        print_json({"grid": str(grid), "n": n, "seed": seed, "seconds": elapsed, "rows": rows})
        return
    from rich.table import Table

    table = Table(title=f"toy-world demo: {n} images per row, judged (content = ring 'sks', style = 'zkz')")
    for col in ("row", "prompt", "content", "style", "both", "merge s"):
        table.add_column(col, justify="left" if col in ("row", "prompt") else "right")
    for r in rows:
        ms = r.get("merge_seconds")
        table.add_row(r["label"], r["prompt"], pct(r["content_acc"]), pct(r["style_acc"]), pct(r["joint_acc"]),
                      "" if ms is None else f"{ms:.2f}")
    con = stdout_console()
    con.print(table)
    con.print(f"grid: {grid}  ({elapsed:.0f} s)")
