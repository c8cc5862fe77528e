"""Toy-world measurement of model mode: quality, merge time and trainable values of

* the LoRAs alone and the direct merge (references),
* ``ziplora`` / ``duolora`` solved from the files alone (weight space, default input model),
* the same with input statistics recorded by ``lora-merge calibrate`` (``--input-model stats``),
* ``ziplora`` / ``duolora`` trained through the model (``--mode model``), and DuoLoRA's ablation
  (ZipRank only → + priors → + Constyle = the full row).

Every merge row is judged on the same N fixed-seed samples of "a sks object in zkz style" as
``lora-merge bench quality``.  Run from the repository root:

    python benchmarks/model_mode_toyworld.py --n 64 --out docs/model-mode-results.md

(``--steps`` changes the model-mode step count; ``--threads`` the torch threads.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--steps", type=int, default=None, help="model-mode steps (default: the strategy default, 100)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated row labels to run (default: all)")
    ap.add_argument("--out", type=Path, default=Path("docs/model-mode-results.md"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from lora_merge.bench.quality import evaluate, run_variant
    from lora_merge.bench.variants import MODEL_ROWS, Variant, calibrate_toyworld, toyworld_common
    from lora_merge.toyworld import JOINT_PROMPT, bundled_loras

    loras = bundled_loras()
    tmp = Path(tempfile.mkdtemp(prefix="lm-model-mode-"))
    t0 = time.perf_counter()
    stats = calibrate_toyworld(tmp / "stats.safetensors", seed=args.seed)
    calib_s = time.perf_counter() - t0
    steps = {} if args.steps is None else {"steps": args.steps}
    variants = [
        Variant("linear (1, 1)", "linear"),
        Variant("ziplora (weights)", "ziplora"),
        Variant("duolora (weights)", "duolora"),
        Variant(
            "ziplora (weights, calibrated stats)", "ziplora", {"input_model": "stats", "stats": str(stats)}
        ),
        Variant(
            "duolora (weights, calibrated stats)", "duolora", {"input_model": "stats", "stats": str(stats)}
        ),
        *[
            Variant(label, strat, {**toyworld_common(strat), **extra, **steps})
            for label, strat, extra in MODEL_ROWS
        ],
    ]
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        variants = [v for v in variants if v.label in keep]
    rows = []
    for label, key in (("content LoRA alone", "content"), ("style LoRA alone", "style")):
        r = evaluate(loras[key], n=args.n, seed=args.seed, prompt=JOINT_PROMPT)
        rows.append({"label": label, **{k: r[k] for k in ("content_acc", "style_acc", "joint_acc")}})
        print(_line(rows[-1]), flush=True)
    for v in variants:
        try:
            r = run_variant(v, loras["content"], loras["style"], n=args.n, seed=args.seed)
        except Exception as exc:  # noqa: BLE001 - a failing row is reported in the table, not hidden
            rows.append({"label": v.label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{v.label}: error {exc}", flush=True)
            continue
        r.pop("images", None)
        rows.append(
            {
                k: r.get(k)
                for k in (
                    "label",
                    "content_acc",
                    "style_acc",
                    "joint_acc",
                    "trainable_values",
                    "merge_seconds",
                    "params",
                )
            }
        )
        print(_line(rows[-1]), flush=True)
    res = {
        "command": "python benchmarks/model_mode_toyworld.py " + " ".join(argv or []),
        "n": args.n, "seed": args.seed, "calibrate_seconds": round(calib_s, 2),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    args.out.write_text(_markdown(res))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _line(r: dict) -> str:
    return (
        f"{r['label']}: content {_pct(r.get('content_acc'))} style {_pct(r.get('style_acc'))} "
        f"both {_pct(r.get('joint_acc'))} trainable {r.get('trainable_values')} s {r.get('merge_seconds')}"
    )


def _markdown(res: dict) -> str:
    lines = [
        "<!-- written by benchmarks/model_mode_toyworld.py; do not edit by hand -->",
        (
            f'Measured by `{res["command"].strip()}` ({res["n"]} samples of "a sks object in zkz style" '
            "per row, "
            f"fixed seeds), {res['date']}, {res['machine']}.  `lora-merge calibrate` of the toy world took "
            f"{res['calibrate_seconds']} s."
        ),
        "",
        "| row | content (ring) | style (zkz) | both | trainable values | merge s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['label']} | error: {r['error']} | | | | |")
            continue
        tv = "" if r.get("trainable_values") is None else f"{r['trainable_values']:,}"
        ms = "" if r.get("merge_seconds") is None else f"{r['merge_seconds']:.1f}"
        lines.append(
            f"| {r['label']} | {_pct(r['content_acc'])} | {_pct(r['style_acc'])} | {_pct(r['joint_acc'])} "
            f"| {tv} | {ms} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
