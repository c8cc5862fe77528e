"""Writing a suite run: ``quality-results.md``, ``quality-results.json``, a grid per pair and two plots
(mean joint accuracy per row with its interval; subject vs style similarity, as the papers plot them).
Plots are drawn with PIL (no matplotlib needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write, atomic_write_json, atomic_write_text, make_dirs, output_transaction
from .quality import pct, save_grid

RESULT_MD = "quality-results.md"
RESULT_JSON = "quality-results.json"
IMAGES = "images/quality"
MEAN_PLOT = "images/quality-mean-joint.png"
SCATTER_PLOT = "images/quality-similarity.png"


def outputs(folder: Path, pairs: list[str]) -> list[Path]:
    """Every file a run writes under ``folder``."""
    return ([folder / RESULT_MD, folder / RESULT_JSON, folder / MEAN_PLOT, folder / SCATTER_PLOT]
            + [folder / IMAGES / f"{p}.png" for p in pairs])


def public(res: dict[str, Any]) -> dict[str, Any]:
    """The JSON document (without the in-memory images)."""
    return {k: v for k, v in res.items() if not k.startswith("_")}


def _ci(ci: list[float] | None) -> str:
    if not ci:
        return ""
    return f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(res: dict[str, Any], command: str) -> str:
    st = res["settings"]
    lines = [
        "<!-- written by `lora-merge bench quality`; do not edit by hand -->",
        "# Merge quality on the toy-world content–style suite",
        "",
        (f"Measured by `{command}`: {len(res['pairs'])} pairs, {st['n']} test images per row (seeds "
         f"{st['seed']}·1000003 + i), tuned linear chosen on {st['val_n']} separate validation seeds, DDIM "
         f"{st['steps']} steps, guidance {st['guidance']}; {res['date']}, {res['machine']}; this pass "
         f"{res['seconds'] / 60:.1f} min ({res['cache']['computed']} rows computed, {res['cache']['hits']} from "
         "the cache; the time of a whole run is in [quality.md](quality.md)).  Accuracies are judged; intervals are 95 % bootstrap intervals.  What the columns mean: "
         "[quality.md](quality.md)."),
        "",
        "## Checks",
        "",
        (f"* Judge on fresh clean renders: shapes min {pct(res['judge']['shape_min'])}, styles min "
         f"{pct(res['judge']['style_min'])} (every class)."),
        (f"* Base-model sanity (seen shape × seen style prompts, {res['sanity']['n']} samples): shape "
         f"{pct(res['sanity']['content_acc'])}, style {pct(res['sanity']['style_acc'])}, both "
         f"{pct(res['sanity']['joint_acc'])}."),
        (f"* The direct merge `linear (1, 1)` falls below 60 % of the ceiling on **{res['direct_fails']['count']} of "
         f"{res['direct_fails']['of']} pairs**" + (f" ({', '.join(res['direct_fails']['pairs'])})."
                                                    if res['direct_fails']['pairs'] else ".")),
        "",
        "## Each LoRA alone",
        "",
        ("Target of the recipes: ≥ 90 % on its own concept at scale 1.0 and ≥ 60 % at 0.6.  *Leakage*: a style "
        "LoRA alone on its pairs' joint prompts drawing its reference shape; a content LoRA alone keeping its "
        "photos' style.  *Binding*: its concept on prompts without its trigger word."),
        "",
        "| LoRA | kind | " + " | ".join(f"×{s}" for s in st["strengths"]) + " | at 0.6 | target | leakage | binding |",
        "|---|---|" + "---:|" * len(st["strengths"]) + "---:|---|---|---:|",
    ]
    for lo in res["loras"]:
        curve = " | ".join(pct(c["acc"]) for c in lo["curve"])
        leak = lo.get("leakage") or {}
        lines.append(f"| {lo['word']} | {lo['kind']} | {curve} | {pct(lo['acc_at_0.6'])} | "
                     f"{'met' if lo['meets_recipe'] else '**missed**'} | "
                     f"{pct(leak.get('rate'))} {leak.get('what', '')} | {pct(lo['binding']['rate'])} |")
    lines += [
        "",
        "## Mean over pairs",
        "",
        f"![mean joint accuracy]({MEAN_PLOT})",
        "",
        ("| row | strategy | mode | joint | 95 % CI | content | style | subject sim | style sim | h-mean | "
        "joint / ceiling |"),
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in sorted(res["mean"], key=lambda m: -(m["joint_acc"] or 0)):
        ratio = m["joint_acc"] / m["ceiling"] if m["ceiling"] else None
        lines.append(f"| {m['label']} | {m['strategy'] or ''} | {m['mode']} | {pct(m['joint_acc'])} | "
                     f"{_ci(m['joint_ci'])} | {pct(m['content_acc'])} | {pct(m['style_acc'])} | "
                     f"{_f(m['subject_sim'])} | {_f(m['style_sim'])} | {_f(m['hmean_sim'])} | {_f(ratio)} |")
    if res["mean"]:
        lines.append(f"\nMean ceiling: {pct(res['mean'][0]['ceiling'])}.")
    lines += ["", f"![subject vs style similarity]({SCATTER_PLOT})", "", "## Per pair", ""]
    for p in res["pairs"]:
        lines += [
            f"### {p['name']} — `{p['joint_prompt']}`",
            "",
            (f"Ceiling {pct(p['ceiling'])} (content LoRA {pct(p['content_lora_acc'])} on its prompt, style LoRA "
             f"{pct(p['style_lora_acc'])} on its check prompts)."),
            "",
            "| row | content | style | joint | 95 % CI | subject sim | style sim | h-mean | merge s |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in p["rows"]:
            if r.get("error"):
                lines.append(f"| {r['label']} | error: {r['error']} | | | | | | | |")
                continue
            label = r["label"] + (f" → ({r['tuned_weights'][0]}, {r['tuned_weights'][1]})"
                                  if r.get("tuned_weights") else "")
            ms = "" if r.get("merge_seconds") is None else f"{r['merge_seconds']:.2f}"
            lines.append(f"| {label} | {pct(r['content_acc'])} | {pct(r['style_acc'])} | {pct(r['joint_acc'])} | "
                         f"{_ci(r.get('joint_ci'))} | {_f(r.get('subject_sim'))} | {_f(r.get('style_sim'))} | "
                         f"{_f(r.get('hmean_sim'))} | {ms} |")
        lines += ["", f"![{p['name']}]({IMAGES}/{p['name']}.png)", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots
_COLORS = {"alone": (150, 150, 150), "weights": (52, 101, 164), "tuned": (78, 154, 6), "model": (204, 0, 102),
           "sampling": (245, 121, 0)}


def plot_mean(res: dict[str, Any], path: Path) -> Path:
    """Horizontal bars: mean joint accuracy per row with its 95 % interval, the mean ceiling dashed."""
    from PIL import Image, ImageDraw, ImageFont

    rows = sorted(res["mean"], key=lambda m: -(m["joint_acc"] or 0))
    font = ImageFont.load_default()
    left, top, bar_h, width = 250, 40, 16, 760
    plot_w = width - left - 40
    height = top + bar_h * len(rows) + 40
    img = Image.new("RGB", (width, max(height, 120)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((10, 6), f"mean joint accuracy over {len(res['pairs'])} pairs (95 % CI)", fill=(0, 0, 0), font=font)
    x = 10
    for mode, label in (("weights", "from the files"), ("tuned", "tuned linear"), ("model", "model mode"),
                        ("sampling", "sampling time"), ("alone", "a LoRA alone")):
        d.rectangle([x, 22, x + 9, 31], fill=_COLORS[mode])
        d.text((x + 13, 21), label, fill=(0, 0, 0), font=font)
        x += 20 + 7 * len(label)
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        x = left + int(plot_w * frac)
        d.line([x, top - 4, x, top + bar_h * len(rows)], fill=(225, 225, 225))
        d.text((x - 8, top + bar_h * len(rows) + 6), f"{int(frac * 100)}%", fill=(80, 80, 80), font=font)
    for i, m in enumerate(rows):
        y = top + i * bar_h
        d.text((8, y + 2), m["label"][:40], fill=(0, 0, 0), font=font)
        w = int(plot_w * (m["joint_acc"] or 0))
        d.rectangle([left, y + 2, left + w, y + bar_h - 3], fill=_COLORS.get(m["mode"], (52, 101, 164)))
        lo, hi = m["joint_ci"]
        yc = y + bar_h // 2
        d.line([left + int(plot_w * lo), yc, left + int(plot_w * hi), yc], fill=(0, 0, 0), width=2)
    if rows:
        xc = left + int(plot_w * rows[0]["ceiling"])
        for y in range(top - 4, top + bar_h * len(rows), 6):
            d.line([xc, y, xc, y + 3], fill=(200, 0, 0))
        d.text((xc + 3, top - 14), "ceiling", fill=(200, 0, 0), font=font)
    make_dirs(path.parent)
    return atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def plot_similarity(res: dict[str, Any], path: Path) -> Path:
    """Scatter: mean subject similarity (x) against mean style similarity (y), one point per row."""
    from PIL import Image, ImageDraw, ImageFont

    pts = [m for m in res["mean"] if m.get("subject_sim") is not None and m.get("style_sim") is not None]
    font = ImageFont.load_default()
    size, pad = 520, 60
    img = Image.new("RGB", (size + 2 * pad + 200, size + 2 * pad), (255, 255, 255))
    d = ImageDraw.Draw(img)
    xs = [m["subject_sim"] for m in pts] or [0, 1]
    ys = [m["style_sim"] for m in pts] or [0, 1]
    x0, x1 = min(xs) - 0.02, max(xs) + 0.02
    y0, y1 = min(ys) - 0.02, max(ys) + 0.02

    def at(x: float, y: float) -> tuple[int, int]:
        return (pad + int(size * (x - x0) / (x1 - x0)), pad + size - int(size * (y - y0) / (y1 - y0)))

    d.rectangle([pad, pad, pad + size, pad + size], outline=(0, 0, 0))
    d.text((pad, 15), "subject similarity (x, shape features) vs style similarity (y, style features)",
           fill=(0, 0, 0), font=font)
    d.text((pad, pad + size + 20), f"subject sim {x0:.2f} … {x1:.2f}", fill=(60, 60, 60), font=font)
    d.text((8, pad - 14), f"style sim {y0:.2f} … {y1:.2f}", fill=(60, 60, 60), font=font)
    for i, m in enumerate(pts):
        cx, cy = at(m["subject_sim"], m["style_sim"])
        c = _COLORS.get(m["mode"], (52, 101, 164))
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=c)
        d.text((cx + 6, cy - 6), str(i + 1), fill=c, font=font)
        d.text((pad + size + 12, pad + 12 * i), f"{i + 1}: {m['label'][:32]}", fill=c, font=font)
    make_dirs(path.parent)
    return atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def write_all(res: dict[str, Any], folder: Path, command: str) -> list[Path]:
    """Every output of a run, put in place together or not at all (the caller has checked overwrites)."""
    written = []
    with output_transaction():
        for name, rows in res.get("_images", {}).items():
            grid_rows = [(label, torch.as_tensor(im).permute(0, 3, 1, 2).float() / 127.5 - 1) for label, im in rows]
            written.append(save_grid(grid_rows, folder / IMAGES / f"{name}.png"))
        written.append(plot_mean(res, folder / MEAN_PLOT))
        written.append(plot_similarity(res, folder / SCATTER_PLOT))
        written.append(atomic_write_json(folder / RESULT_JSON, public(res)))
        written.append(atomic_write_text(folder / RESULT_MD, markdown(res, command)))
    return written


__all__ = ["RESULT_JSON", "RESULT_MD", "markdown", "outputs", "plot_mean", "plot_similarity", "public", "write_all"]
