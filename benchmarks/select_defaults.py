"""Choose a sampling-time merger's defaults on the suite's *validation* seeds (never the test seeds
that ``lora-merge bench quality`` reports), the way tuned linear chooses its weights.

    python benchmarks/select_defaults.py timestep-split --val-n 16 --json docs/defaults-timestep-split.json

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
from lora_merge.sampling_time import build
from lora_merge.toyworld import load_base, load_judge, sample
from lora_merge.toyworld.suite import pairs as suite_pairs

GRIDS = {
    "timestep-split": [
        {"switch": sw, "early": [1.0, es], "late": [lc, 1.0]}
        for sw, es, lc in itertools.product((0.2, 0.35, 0.5, 0.65), (0.0, 0.5), (0.0, 0.5, 1.0))
    ],
    "k-lora": [{"gamma": g} for g in ("auto", 0.5, 1.0, 2.0)],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("merger", choices=sorted(GRIDS))
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
    for params in GRIDS[args.merger]:
        accs = []
        for p in ps:
            m = build(args.merger, *loras[p.name], **params)
            imgs = sample(world, p.joint_prompt, seeds, merger=m)
            accs.append(judge_metrics(imgs, judge, p.subject, p.style)["joint_acc"])
        row = {"params": params, "mean_joint": sum(accs) / len(accs), "per_pair": dict(zip([p.name for p in ps], accs))}
        rows.append(row)
        print(f"{json.dumps(params)}  mean validation joint {100 * row['mean_joint']:.1f}%  "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    best = max(rows, key=lambda r: r["mean_joint"])
    print(f"best: {json.dumps(best['params'])} ({100 * best['mean_joint']:.1f}%)")
    if args.json:
        args.json.write_text(json.dumps({"merger": args.merger, "val_n": args.val_n, "rows": rows, "best": best},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
