"""Choose a sampling-time merger's defaults on the suite's *validation* seeds (never the test seeds
that ``lora-merge bench quality`` reports), the way tuned linear chooses its weights.

    python benchmarks/select_defaults.py timestep-split --val-n 16 --json docs/defaults-timestep-split.json
    python benchmarks/select_defaults.py timestep-split-2 --val-n 16 --json docs/defaults-timestep-split-2.json

Prints one row per candidate (mean validation joint accuracy over the pairs) as it is measured, then the
best.  The candidates are a small grid written below; nothing here reads a test seed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

from lora_merge import load
from lora_merge.bench.metrics import judge_metrics
from lora_merge.bench.suite import validation_seeds
from lora_merge.files import atomic_write_json
from lora_merge.sampling_time import build
from lora_merge.toyworld import load_base, load_judge, sample
from lora_merge.toyworld.suite import pairs as suite_pairs

GRIDS = {
    # the first grid (docs/defaults-timestep-split.json) ...
    "timestep-split": [
        {"switch": sw, "early": [1.0, es], "late": [lc, 1.0]}
        for sw, es, lc in itertools.product((0.2, 0.35, 0.5, 0.65), (0.0, 0.5), (0.0, 0.5, 1.0))
    ],
    # ... and the second, around its best point (later switches, a weaker early style)
    "timestep-split-2": [
        {"switch": sw, "early": [1.0, es], "late": [lc, 1.0]}
        for sw, es, lc in itertools.product((0.5, 0.65, 0.75, 0.85), (0.0, 0.25, 0.5), (0.0, 1.0))
    ],
    "k-lora": [{"gamma": g} for g in ("auto", 0.5, 1.0, 2.0)],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", choices=sorted(GRIDS), help="a merger name, or a merger's later grid (NAME-2)")
    ap.add_argument("--val-n", type=int, default=16)
    ap.add_argument("--pairs", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    world, judge = load_base(), load_judge()
    ps = suite_pairs(args.pairs)
    loras = {p.name: tuple(load(x) for x in p.paths()) for p in ps}
    seeds = validation_seeds(args.val_n)
    rows = []
    t0 = time.perf_counter()
    merger = args.grid.removesuffix("-2")
    for params in GRIDS[args.grid]:
        accs = []
        for p in ps:
            m = build(merger, *loras[p.name], **params)
            imgs = sample(world, p.joint_prompt, seeds, merger=m)
            accs.append(judge_metrics(imgs, judge, p.subject, p.style)["joint_acc"])
        row = {"params": params, "mean_joint": sum(accs) / len(accs), "per_pair": dict(zip([p.name for p in ps], accs))}
        rows.append(row)
        print(f"{json.dumps(params)}  mean validation joint {100 * row['mean_joint']:.1f}%  "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    best = max(rows, key=lambda r: r["mean_joint"])
    print(f"best: {json.dumps(best['params'])} ({100 * best['mean_joint']:.1f}%)")
    if args.json:
        atomic_write_json(args.json, {"merger": merger, "grid": args.grid, "val_n": args.val_n, "rows": rows,
                                      "best": best}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
