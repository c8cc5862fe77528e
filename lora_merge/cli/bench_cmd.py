"""``lora-merge bench``: end-to-end benchmarks.  ``bench quality`` judges merges in the toy world."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import click

from ..errors import LoraMergeError
from .common import json_option, print_json, stderr_console, stdout_console, threads_option

RESULT_MD = "quality-results.md"
RESULT_JSON = "quality-results.json"
GRID = "images/quality-grid.png"
REF_GRID = "images/quality-reference.png"


@click.group("bench")
def bench() -> None:
    """End-to-end benchmarks (see docs/quality.md)."""


def _markdown(res: dict) -> str:
    from ..bench.quality import pct

    lines = [
        "<!-- written by `lora-merge bench quality`; do not edit by hand -->",
        (f"Measured by `{res['command']}` ({res['n']} images per row, seeds {res['seed']}·1000003 + i, DDIM "
        f"{res['steps']} steps, guidance {res['guidance']}), {res['date']}, {res['machine']}."),
        "",
        (f"Judge accuracy on fresh clean renders: shapes min {pct(res['judge']['shape_min'])}, styles min "
        f"{pct(res['judge']['style_min'])} (every class, `sks` and `zkz` included).  Base-model sanity "
        f"(seen shape × seen style prompts, {res['sanity']['n']} samples): shape {pct(res['sanity']['content_acc'])}, "
        f"style {pct(res['sanity']['style_acc'])}, both {pct(res['sanity']['joint_acc'])}."),
        "",
        "| row | prompt | content (ring) | style (zkz) | both | trainable values | merge s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['label']} | {r['prompt']} | error: {r['error']} | | | | |")
            continue
        tv = "" if r.get("trainable_values") is None else f"{r['trainable_values']:,}"
        ms = "" if r.get("merge_seconds") is None else f"{r['merge_seconds']:.2f}"
        lines.append(f"| {r['label']} | {r['prompt']} | {pct(r['content_acc'])} | {pct(r['style_acc'])} | "
                     f"{pct(r['joint_acc'])} | {tv} | {ms} |")
    lines += ["", f"![samples]({GRID})", ""]
    return "\n".join(lines)


@bench.command("quality")
@click.option("--n", "n", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="Images per row (the published numbers use 64).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("docs"), show_default=True,
              help=f"Folder for {RESULT_MD}, {RESULT_JSON} and {GRID}.")
@click.option("--strategies", default=None, help="Comma-separated strategies (default: every registered one).")
@click.option("--no-ablations", is_flag=True, help="Run each strategy with its defaults only.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing result files.")
@json_option
@threads_option
def quality(n: int, out: Path, strategies: str | None, no_ablations: bool, seed: int, force: bool,
            as_json: bool) -> None:
    """Merge the bundled toy-world content and style LoRAs with every strategy (and the ablations a
    strategy offers), sample "a sks object in zkz style" N times with fixed seeds, and judge content,
    style and both.  Rows for the LoRAs alone come first; the judge's accuracy and the base model's
    sanity numbers are printed too."""
    from ..bench.quality import _cached_judge, base_sanity, evaluate, pct, run_variant, save_grid
    from ..bench.variants import all_variants
    from ..files import atomic_write_json, atomic_write_text, check_output_folder, refuse_existing
    from ..toyworld import CONTENT_PROMPT, JOINT_PROMPT, STYLE_PROMPT, bundled_loras
    from ..toyworld.judge import per_class_accuracy
    from ..toyworld.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS

    for t in (out / RESULT_MD, out / RESULT_JSON, out / GRID, out / REF_GRID):
        refuse_existing(t, force)
        check_output_folder(t, create=True)
    names = [s.strip() for s in strategies.split(",")] if strategies else None
    variants = all_variants(names, ablations=not no_ablations)
    loras = bundled_loras()
    err = stderr_console()
    t_all = time.perf_counter()
    with err.status("judge accuracy and base-model sanity…"):
        acc = per_class_accuracy(_cached_judge())
        sanity = base_sanity()
    judge_info = {"per_class": acc, "shape_min": min(acc["shape"].values()), "style_min": min(acc["style"].values())}
    rows: list[dict] = []
    images = []
    refs = [
        ("content LoRA alone", loras["content"], CONTENT_PROMPT),
        ("style LoRA alone", loras["style"], STYLE_PROMPT),
        ("content LoRA alone", loras["content"], JOINT_PROMPT),
        ("style LoRA alone", loras["style"], JOINT_PROMPT),
    ]
    for label, path, prompt in refs:
        with err.status(f"{label}: {prompt}…"):
            r = evaluate(path, n=n, seed=seed, prompt=prompt, return_images=True)
        images.append((f"{label}: {prompt}", r.pop("images")))
        rows.append({"label": label, "strategy": None, "merge_seconds": None, "trainable_values": None, **r})
    for i, v in enumerate(variants, 1):
        with err.status(f"[{i}/{len(variants)}] {v.label}: merging and sampling…"):
            try:
                r = run_variant(v, loras["content"], loras["style"], n=n, seed=seed)
            except LoraMergeError as exc:  # a strategy that cannot merge these inputs is a table row, not a crash
                rows.append({"label": v.label, "strategy": v.strategy, "params": v.params, "prompt": JOINT_PROMPT,
                             "error": str(exc)})
                err.print(f"warning: {v.label}: {exc}")
                continue
        images.append((v.label, r.pop("images")))
        rows.append(r)
    res = {
        "command": "lora-merge bench quality " + " ".join(
            [f"--n {n}"] + ([f"--strategies {strategies}"] if strategies else [])
            + (["--no-ablations"] if no_ablations else [])),
        "n": n,
        "seed": seed,
        "steps": DEFAULT_STEPS,
        "guidance": DEFAULT_GUIDANCE,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {__import__('torch').get_num_threads()}",
        "seconds": None,
        "judge": judge_info,
        "sanity": {k: v for k, v in sanity.items() if k not in ("images", "combos")},
        "rows": rows,
    }
    save_grid(images, out / GRID)
    save_grid([(f"base: {a} {b}", sanity["images"][i * 4:(i + 1) * 4])
               for i, (a, b) in enumerate(sanity["combos"])], out / REF_GRID)
    res["seconds"] = time.perf_counter() - t_all
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULT_JSON, res)
    atomic_write_text(out / RESULT_MD, _markdown(res))
    if as_json:
        print_json(res)
        return
    from rich.table import Table

    con = stdout_console()
    con.print(f"judge on fresh renders: shape accuracy min {pct(judge_info['shape_min'])}, style min "
              f"{pct(judge_info['style_min'])}; base-model sanity ({sanity['n']} samples of seen combinations): "
              f"shape {pct(sanity['content_acc'])}, style {pct(sanity['style_acc'])}, both {pct(sanity['joint_acc'])}")
    table = Table(title=f"toy-world merge quality ({n} images per row)")
    for col in ("row", "prompt", "content", "style", "both", "trainable", "merge s"):
        table.add_column(col, justify="left" if col in ("row", "prompt") else "right")
    for r in rows:
        if r.get("error"):
            table.add_row(r["label"], r["prompt"], f"[red]error: {r['error']}[/]", "", "", "", "")
            continue
        tv = "" if r.get("trainable_values") is None else f"{r['trainable_values']:,}"
        ms = "" if r.get("merge_seconds") is None else f"{r['merge_seconds']:.2f}"
        table.add_row(r["label"], r["prompt"], pct(r["content_acc"]), pct(r["style_acc"]), pct(r["joint_acc"]),
                      tv, ms)
    con.print(table)
    con.print(f"wrote {out / RESULT_MD}, {out / RESULT_JSON}, {out / GRID} ({res['seconds']:.0f} s)")
