"""Where the file-only mask solvers put each LoRA's strength: per block group, the mean content and style
mask of ``ziplora`` and ``duolora`` solved from the files alone, as solved (``--strength free``) and
as used by default (``--strength preserve``), on the suite's pairs.  No sampling; seconds per pair.

    python benchmarks/diagnose_masks.py --pairs sks+zkz,ohwx+mrv,tqk+bfk

A mean mask of 0.7 scales that LoRA's update in that block to 0.7 of its strength; read next to the
LoRAs' strength curves in docs/quality-results.md (a concept that vanishes below ~0.6–0.75 strength).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from lora_merge import merge
from lora_merge.toyworld.suite import pairs as suite_pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="sks+zkz,ohwx+mrv,tqk+bfk")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = []
    for p in suite_pairs(args.pairs):
        for strat in ("ziplora", "duolora"):
            for params in ({"strength": "free"}, {"strength": "free", "preset": "paper"} if strat == "duolora" else None):
                if params is None:
                    continue
                rep = merge(list(p.paths()), None, strategy=strat, params=params, arch="toyworld").report["strategy"]
                blocks = {b: (v["mask_content"], v["mask_style"])  # already per-layer means
                          for b, v in rep["blocks"].items()}
                mc = sum(c for c, _ in blocks.values()) / len(blocks)
                ms = sum(s for _, s in blocks.values()) / len(blocks)
                row = {"pair": p.name, "strategy": strat, "params": params, "mean_content": mc, "mean_style": ms,
                       "blocks": blocks}
                out.append(row)
                if not args.json:
                    per = "  ".join(f"{b.replace('.attentions', '')}: {c:.2f}/{s:.2f}" for b, (c, s) in blocks.items())
                    print(f"{p.name:9s} {strat:8s} {json.dumps(params):40s} mean content {mc:.2f} style {ms:.2f} | {per}",
                          flush=True)
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
