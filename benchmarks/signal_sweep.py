"""SIGINT/SIGTERM at random moments of a real ``lora-merge merge`` of a synthetic SDXL attention pair
(560 layers, rank 64, ``--rank 64`` so the layers are re-factored on worker threads; a few seconds),
from outside, as a user's Ctrl-C or a job scheduler's kill would come.

    python benchmarks/signal_sweep.py --runs 24 --seed 3

Each run starts the console entry point in a fresh process, sends the signal after a delay drawn
uniformly from [0.02 s, 85% of the measured duration of an uninterrupted run] — or, for every third run
(the *late* window), from [90%, 130%] of it, around the commit and the interpreter's shutdown, where a
finished command must still exit 0 — and classifies the outcome:

- ``interrupted``: exit 130, stderr's last line ``interrupted`` (before it only the merge's warnings, e.g.
  what ``--rank 64`` lost), no output, no temporary file;
- ``completed``: the signal came after the outputs were in place (exit 0, output whole and loadable);
- anything else is a failure (a traceback, another exit code, a partial output or a stray temporary file).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_pair(folder: Path) -> list[Path]:
    from sdxl_pair import sdxl_attention_layout, synthetic_pair

    import lora_merge as lm

    a, b = synthetic_pair(sdxl_attention_layout(), rank=64)
    return [lm.save(a, folder / "content.safetensors"), lm.save(b, folder / "style.safetensors")]


def one_run(inputs: list[Path], out_dir: Path, sig: int | None, delay: float) -> tuple[str, float, str]:
    out = out_dir / "merged.safetensors"
    report = out_dir / "report.json"
    code = "import sys; from lora_merge.cli import main; sys.argv[0] = 'lora-merge'; main()"
    argv = [sys.executable, "-c", code, "merge", *map(str, inputs), "-o", str(out), "--rank", "64",
            "--report", str(report)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if sig is not None:
        time.sleep(delay)
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    wall = time.perf_counter() - t0
    left = sorted(p.name for p in out_dir.iterdir())
    lines = err.strip().splitlines()
    clean = bool(lines) and lines[-1] == "interrupted" and all(x.startswith("warning: ") for x in lines[:-1])
    if proc.returncode == 130 and clean and not left:
        return "interrupted", wall, ""
    if proc.returncode == 0 and left == ["merged.safetensors", "report.json"]:
        import lora_merge as lm

        lm.load(out)  # whole and readable
        return "completed", wall, ""
    return "FAILED", wall, f"exit {proc.returncode}, left {left}, stderr {err.strip()[-300:]!r}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        inputs = make_pair(d)
        base = d / "base"
        base.mkdir()
        outcome, full, _ = one_run(inputs, base, None, 0.0)
        assert outcome == "completed", outcome
        print(f"uninterrupted run: {full:.2f} s")
        counts: Counter = Counter()
        failures = []
        for i in range(a.runs):
            sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
            late = i % 3 == 2
            # runs vary; later ones often find the process done
            delay = rng.uniform(0.9 * full, 1.3 * full) if late else rng.uniform(0.02, 0.85 * full)
            out_dir = d / f"run{i}"
            out_dir.mkdir()
            outcome, wall, detail = one_run(inputs, out_dir, sig, delay)
            name = f"{sig.name} (late)" if late else sig.name
            counts[(name, outcome)] += 1
            print(f"  {name:14s} at {delay:5.2f} s: {outcome} ({wall:.2f} s)" + (f" {detail}" if detail else ""))
            if outcome == "FAILED":
                failures.append(detail)
        print("\n| signal | interrupted | completed | failed |\n| --- | --- | --- | --- |")
        for name in ("SIGINT", "SIGTERM", "SIGINT (late)", "SIGTERM (late)"):
            print(f"| {name} | {counts[(name, 'interrupted')]} | {counts[(name, 'completed')]} | "
                  f"{counts[(name, 'FAILED')]} |")
        sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
