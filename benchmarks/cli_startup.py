"""CLI start-up time: ``lora-merge --version``, ``--help`` and ``strategies`` against ``python -c pass``.

    python benchmarks/cli_startup.py [--runs 15]

Each command runs in a fresh interpreter (``python -c "from lora_merge.cli import main; main()" ARGS``,
what the ``lora-merge`` console script does, without the launcher shim); the median wall time of
``--runs`` runs is printed with its ratio to ``python -c pass`` measured in the same session (so a busy
machine shifts both).  Target: under 0.5 s, no torch import (``lora_merge.cli.fast``).  For
comparison it also times ``lora-merge merge --help``, which imports torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

ENTRY = "from lora_merge.cli import main; main()"
CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "lora-merge --version": [sys.executable, "-c", ENTRY, "--version"],
    "lora-merge --help": [sys.executable, "-c", ENTRY, "--help"],
    "lora-merge strategies": [sys.executable, "-c", ENTRY, "strategies"],
    "lora-merge merge --help (imports torch)": [sys.executable, "-c", ENTRY, "merge", "--help"],
}


def median_time(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    runs = ap.parse_args().runs
    base = median_time(CASES["python -c pass"], runs)
    print(f"{'command':42} {'median s':>9} {'× python -c pass':>17}")
    for name, cmd in CASES.items():
        t = base if name == "python -c pass" else median_time(cmd, runs)
        print(f"{name:42} {t:9.3f} {t / base:17.2f}")


if __name__ == "__main__":
    main()
