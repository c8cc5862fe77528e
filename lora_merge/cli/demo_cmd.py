"""``lora-merge demo``: merge one content–style pair of the toy-world suite and show the result."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import UsageError
from .common import json_option, print_json, stderr_console, stdout_console, threads_option

#: the suite pair the demo merges by default
DEMO_PAIR = "ohwx+mrv"


@click.command("demo")
@click.option("--n", "n", default=8, show_default=True, type=click.IntRange(1, 4096),
              help="Images per row (each judged).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("lora-merge-demo.png"),
              show_default=True, help="The comparison grid PNG.")
@click.option("--strategies", default=None,
              help="Comma-separated strategies (default: linear at (1,1) and (0.5,0.5), plus ziplora and "
                   "duolora when available).")
@click.option("--pair", default=DEMO_PAIR, show_default=True,
              help="The suite pair to merge (subject+style; `lora-merge bench quality --help` lists the suite).")
@click.option("--seed", default=0, show_default=True, help="Sampling and merge seed.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@threads_option
@json_option
def demo(n: int, out: Path, strategies: str | None, pair: str, seed: int, force: bool, as_json: bool) -> None:
    """Merge a content LoRA and a style LoRA of the toy-world suite (default: the ohwx hourglass, trained
    DreamBooth-style on 6 striped photos, and the mrv coarse-check style, trained StyleDrop-style on one
    image of a square) with a few strategies, draw the joint prompt for each, and judge every image.

    Writes a grid PNG (rows: content LoRA alone, style LoRA alone, then one row per strategy) and prints
    the judge's table.  Everything runs on CPU from the weights shipped with the package.
    """
    from ..bench.quality import evaluate, pct, run_variant, save_grid
    from ..bench.variants import demo_variants
    from ..files import check_output_folder, refuse_existing
    from ..toyworld.suite import pairs, style_check_prompts

    chosen = pairs(pair)
    if len(chosen) != 1:
        raise UsageError(f"--pair: name one pair, not {pair!r}")
    p = chosen[0]
    refuse_existing(out, force)
    check_output_folder(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"{out}: --out must be a .png file")
    variants = demo_variants(strategies)
    content, style = p.paths()
    style_prompt = style_check_prompts(p.style)[0]
    err = stderr_console()
    t0 = time.perf_counter()
    rows = []
    with err.status("sampling the LoRAs alone…"):
        c = evaluate(content, n=n, seed=seed, prompt=p.content_prompt, return_images=True)
        s = evaluate(style, n=n, seed=seed, prompt=style_prompt, return_images=True)
        rows.append({"label": "content LoRA alone", "prompt": p.content_prompt, **c})
        rows.append({"label": "style LoRA alone", "prompt": style_prompt, **s})
    for v in variants:
        with err.status(f"merging with {v.label} and sampling…"):
            r = run_variant(v, content, style, n=n, seed=seed, prompt=p.joint_prompt)
        rows.append({"prompt": p.joint_prompt, **r})
    merged = [r for r in rows if r.get("strategy")]
    best = max(merged, key=lambda r: (r["joint_acc"] or 0.0), default=None)
    grid = save_grid([(f"{r['label']}", r["images"]) for r in rows], out)
    elapsed = time.perf_counter() - t0
    for r in rows:
        r.pop("images", None)
    if as_json:
        print_json({"grid": str(grid), "pair": p.name, "n": n, "seed": seed, "seconds": elapsed,
                    "best": best["label"] if best else None, "rows": rows})
        return
    from rich.table import Table

    table = Table(title=f"toy-world demo {p.name}: {n} images per row, judged (content = {p.subject}, "
                        f"style = {p.style})")
    for col in ("row", "prompt", "content", "style", "both", "merge s"):
        table.add_column(col, justify="left" if col in ("row", "prompt") else "right")
    for r in rows:
        ms = r.get("merge_seconds")
        label = r["label"] + ("  ← best" if r is best else "")
        table.add_row(label, r["prompt"], pct(r["content_acc"]), pct(r["style_acc"]), pct(r["joint_acc"]),
                      "" if ms is None else f"{ms:.2f}", style="bold green" if r is best else None)
    con = stdout_console()
    con.print(table)
    if best:
        con.print(f"best merge on this pair: {best['label']} ({pct(best['joint_acc'])} judged both subject and style)")
    con.print(f"grid: {grid}  ({elapsed:.0f} s)")
