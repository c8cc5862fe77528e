"""Merge speed before and after a code change, measured in one run: the same merges timed with this
checkout's ``lora_merge`` and with the one of another git revision, alternating, on a synthetic SDXL
attention pair (560 layers, rank 64, fp16 kohya files; ``sdxl_pair.py``) or, with ``--pair sd15``, on two
real SD 1.5 LoRAs (128 attention modules, rank 4: the project's fixtures when present, else generated
with their shapes) — the pair where the dense strategies were slow:

    python benchmarks/layout_speed.py --pair sd15 --cases ties,dare,magnitude-prune,linear,svd --base 7bc4cb1

    python benchmarks/layout_speed.py                      # against 14c2c64 (before the engine split)
    python benchmarks/layout_speed.py --base REV --rounds 5 --json
    python benchmarks/layout_speed.py --base 14c2c64 --head 7e47d1e     # two revisions

Each timing is one merge in a fresh process (imports excluded: the merge call alone, with
``--threads 1`` so the two sides do not compete for the two cores), rounds alternate the two trees so
machine load hits both alike, and the table reports the ratio of medians (after / before).  The output
bytes of both trees are compared too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CASES = {
    "linear": {},
    "linear --rank 64": {"rank": 64},
    "svd --rank 32": {"strategy": "svd", "rank": 32},
    "ziplora --steps 10": {"strategy": "ziplora", "params": {"steps": 10}},
    "ties --rank 32": {"strategy": "ties", "rank": 32},  # dense per layer: minutes a run on 2 cores
}
DEFAULT_CASES = ("linear", "linear --rank 64", "svd --rank 32", "ziplora --steps 10")
#: the dense strategies at their default rank (the sum of the inputs' ranks) and the references
CASES.update({"ties": {"strategy": "ties"}, "dare": {"strategy": "dare"},
              "magnitude-prune": {"strategy": "magnitude-prune"}, "svd": {"strategy": "svd"}})

TIMER = textwrap.dedent(
    """
    import hashlib, json, sys, time, torch
    torch.set_num_threads(1)
    import lora_merge as lm
    a, b, out, kw = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    t0 = time.perf_counter()
    import warnings
    warnings.simplefilter("ignore")
    res = lm.merge([a, b], out, dtype="fp16", threads=1, force=True, **kw)
    dt = time.perf_counter() - t0
    lost = res.report.get("dense") or res.report.get("truncation") or {}
    ad = lm.load(out)
    h = hashlib.sha256()
    for name in sorted(ad.modules):
        m = ad.modules[name]
        h.update(m.up.load().numpy().tobytes()); h.update(m.down.load().numpy().tobytes())
    print(json.dumps({"seconds": dt, "tensors": h.hexdigest(), "rel_error": lost.get("rel_error_overall")}))
    """
)


def _pair(folder: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(HERE))
    from sdxl_pair import sdxl_attention_layout, synthetic_pair

    import lora_merge as lm

    content, style = synthetic_pair(sdxl_attention_layout(), rank=64)
    a, b = folder / "content.safetensors", folder / "style.safetensors"
    import torch

    lm.save(content, a, to="kohya", dtype=torch.float16)
    lm.save(style, b, to="kohya", dtype=torch.float16)
    return a, b


def _sd15_pair(folder: Path) -> tuple[Path, Path]:
    """Two real SD 1.5 LoRAs (the fixtures beside the checkout), or generated ones of their shapes."""
    fixtures = REPO.parent / "shared" / "fixtures" / "sd15"
    real = [fixtures / "pokemon_style.safetensors", fixtures / "rick_and_morty_style.safetensors"]
    if all(p.is_file() for p in real):
        return real[0], real[1]
    import torch

    import lora_merge as lm

    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        ad = lm.Adapter(dialect="kohya")
        for blk in ("down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2",
                    "up_blocks.3"):
            d = {"down_blocks.0": 320, "down_blocks.1": 640, "down_blocks.2": 1280, "mid_block": 1280,
                 "up_blocks.1": 1280, "up_blocks.2": 640, "up_blocks.3": 320}[blk]
            for a_ in range(2 if blk != "mid_block" else 1):
                for attn in ("attn1", "attn2"):
                    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                        name = f"unet.{blk}.attentions.{a_}.transformer_blocks.0.{attn}.{proj}"
                        d_in = 768 if attn == "attn2" and proj in ("to_k", "to_v") else d
                        ad.modules[name] = lm.LoraModule.from_tensors(
                            name, torch.randn(4, d_in, generator=g) / d_in**0.5,
                            torch.randn(d, 4, generator=g) * 0.01, alpha=4.0)
        paths.append(lm.save(ad, folder / f"sd15_{i}.safetensors", to="kohya"))
    return paths[0], paths[1]


def _max_rel_diff(before: Path, after: Path) -> float:
    """max over modules of ‖ΔW_after − ΔW_before‖ / ‖ΔW_before‖ (the outputs of the two trees)."""
    import lora_merge as lm

    a, b = lm.load(before), lm.load(after)
    worst = 0.0
    for name, m in a.modules.items():
        da, db = m.delta().double(), b.modules[name].delta().double()
        worst = max(worst, float((db - da).norm() / da.norm()) if float(da.norm()) > 0 else float(db.norm()))
    return worst


def _time(tree: Path, a: Path, b: Path, out: Path, kw: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", TIMER, str(a), str(b), str(out), json.dumps(kw)],
                         env=env, capture_output=True, text=True, check=False, cwd=out.parent)  # fmt: skip
    if res.returncode:
        raise SystemExit(f"{tree}: the merge failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="14c2c64", help="git revision to compare against")
    ap.add_argument("--head", default=None, help="git revision to measure instead of this checkout")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--pair", choices=("sdxl", "sd15"), default="sdxl",
                    help="synthetic SDXL attention pair (560 layers, rank 64) or two SD 1.5 LoRAs (128, rank 4)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(base), args.base], check=True)
        head = REPO
        if args.head:
            head = tmp / "head"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(head), args.head],
                           check=True)  # fmt: skip
        try:
            a, b = _pair(tmp) if args.pair == "sdxl" else _sd15_pair(tmp)
            rows = []
            for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
                kw = CASES[case]
                times: dict[str, list[float]] = {"before": [], "after": []}
                digests, errors = {}, {}
                for _ in range(args.rounds):
                    for side, tree in (("before", base), ("after", head)):
                        r = _time(tree, a, b, tmp / f"{side}.safetensors", kw)
                        times[side].append(r["seconds"])
                        digests[side] = r["tensors"]
                        errors[side] = r.get("rel_error")
                before, after = statistics.median(times["before"]), statistics.median(times["after"])
                rows.append({"case": case, "before_s": before, "after_s": after, "ratio": after / before,
                             "same_tensors": digests["before"] == digests["after"],
                             "rel_error_before": errors["before"], "rel_error_after": errors["after"],
                             "max_rel_dW_diff": _max_rel_diff(tmp / "before.safetensors",
                                                              tmp / "after.safetensors")})  # fmt: skip
                if not args.json:
                    print(f"  {case}: {before:.3f} s → {after:.3f} s", file=sys.stderr, flush=True)
        finally:
            for tree in {base, head} - {REPO}:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    if args.json:
        print(json.dumps({"base": args.base, "head": args.head, "rounds": args.rounds, "rows": rows}, indent=2))
        return
    what = args.head or "this checkout"
    print(f"merge speed, {what} vs {args.base} (median of {args.rounds} alternating rounds, 1 thread)")
    print(f"{'case':<22} {'before s':>9} {'after s':>9} {'ratio':>7}  same tensors  max ‖ΔW diff‖/‖ΔW‖  "
          "stored error before → after")

    def err(x):
        return "-" if x is None else f"{x:.6f}"

    for r in rows:
        print(f"{r['case']:<22} {r['before_s']:>9.3f} {r['after_s']:>9.3f} {r['ratio']:>7.3f}  "
              f"{r['same_tensors']!s:<12}  {r['max_rel_dW_diff']:>17.2e}  "
              f"{err(r['rel_error_before'])} → {err(r['rel_error_after'])}")


if __name__ == "__main__":
    main()
