"""``lora-merge bench``: end-to-end benchmarks.  ``bench quality`` judges merges on the toy-world suite."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import click

from ..errors import UsageError
from .common import json_option, output_option, print_json, stderr_console, stdout_console, threads_option


@click.group("bench")
def bench() -> None:
    """End-to-end benchmarks (see docs/quality.md)."""


def default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "lora-merge" / "bench-quality"


@bench.command("quality")
@click.option("--pairs", default=None, metavar="NAME[,NAME...]",
              help="Suite pairs to run, e.g. sks+zkz,tqk+mrv (default: all 9; --quick: sks+zkz, ohwx+bfk, tqk+mrv).")
@click.option("--n", "n", default=None, type=click.IntRange(1, 100000),
              help="Test images per row (default 64; --quick 32).")
@click.option("--val-n", default=None, type=click.IntRange(1, 100000),
              help="Validation images per tuned-linear grid point (default 16).")
@click.option("--strategies", default=None,
              help="Comma-separated strategies (default: every registered one that merges two inputs).")
@click.option("--no-ablations", is_flag=True, help="Run each strategy with its defaults only.")
@click.option("--no-model-mode", is_flag=True, help="Skip the rows trained through the model (--mode model).")
@click.option("--quick", is_flag=True,
              help="3 pairs, n = 32, no ablations, strength curves at 0.5/0.6/1.0 only: a smoke run of every "
                   "strategy with its defaults.")
@output_option("Folder for quality-results.md/.json and the images (--out is the older spelling).",
               extra=("--out",), type=click.Path(file_okay=False, path_type=Path), default=Path("docs"),
               show_default=True)
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Row cache folder: an interrupted run resumes from it (default: ~/.cache/lora-merge/bench-quality).")
@click.option("--no-cache", is_flag=True, help="Recompute every row and keep nothing.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes: the pairs are shared out, the rows meet in the cache, then one pass "
                   "writes the results (each worker uses --threads torch threads).")
@click.option("--seed", default=0, show_default=True, help="Seed of the sampling and the merges.")
@click.option("--force", is_flag=True, help="Overwrite existing result files.")
@json_option
@threads_option
def quality(pairs: str | None, n: int | None, val_n: int | None, strategies: str | None, no_ablations: bool,
            no_model_mode: bool, quick: bool, output: Path, cache_dir: Path | None, no_cache: bool, jobs: int,
            seed: int, force: bool, as_json: bool) -> None:
    """Merge every content–style pair of the toy-world suite with every strategy (and its ablations),
    sample each pair's joint prompt ("a sks object in zkz style") on fixed test seeds and judge content,
    style and both, with 95 % bootstrap intervals, subject and style similarity.

    Also measured: each LoRA's strength curve, leakage and prompt binding; a ceiling per pair; the
    baselines (the LoRAs alone, linear (1, 1), linear (0.5, 0.5), and tuned linear: the best weights of a
    0.4…1.2 grid chosen on separate validation seeds).  Writes quality-results.md, quality-results.json
    (also what --json prints), a grid per pair and two plots under -o/--output.  See docs/quality.md."""
    import torch

    from ..bench.report import outputs, public, write_all
    from ..bench.suite import QUICK_STRENGTHS, SuiteSettings, run_suite
    from ..bench.variants import all_variants, known_strategies
    from ..files import check_output_folder, refuse_existing
    from ..toyworld.suite import QUICK
    from ..toyworld.suite import pairs as suite_pairs

    out = output
    chosen = suite_pairs(pairs or (list(QUICK) if quick else None))
    names = [s.strip() for s in strategies.split(",") if s.strip()] if strategies else None
    avail = known_strategies()
    for s in names or []:
        if s not in avail:
            raise UsageError(f"--strategies: unknown strategy {s!r}; available: {', '.join(avail)}")
    for t in outputs(out, [p.name for p in chosen]):
        refuse_existing(t, force)
        check_output_folder(t, create=True)
    settings = SuiteSettings(n=n or (32 if quick else 64), val_n=val_n or 16, seed=seed,
                             cache=None if no_cache else (cache_dir or default_cache()),
                             **({"strengths": QUICK_STRENGTHS} if quick else {}))
    ablations = not (no_ablations or quick)
    err = stderr_console()
    if jobs > 1 and len(chosen) > 1:
        if settings.cache is None:
            raise UsageError("--jobs needs the row cache (drop --no-cache)")
        _run_workers(chosen, jobs, settings, strategies, no_ablations, no_model_mode, quick, seed, err)
    done = [0]
    with err.status("loading the toy world…") as status:
        def progress(msg: str) -> None:
            done[0] += 1
            status.update(f"[{done[0]}] {msg}")

        res = run_suite(chosen, lambda p: all_variants(names, ablations=ablations, pair=p,
                                                       model_mode=not no_model_mode),
                        settings, progress=progress)
    command = "lora-merge bench quality " + " ".join(
        (["--quick"] if quick else []) + ([f"--pairs {pairs}"] if pairs else [])
        + ([f"--n {n}"] if n else []) + ([f"--val-n {val_n}"] if val_n else [])
        + ([f"--strategies {strategies}"] if strategies else []) + (["--no-ablations"] if no_ablations else [])
        + (["--no-model-mode"] if no_model_mode else []) + ([f"--jobs {jobs}"] if jobs > 1 else []))
    res["command"] = command.strip()
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["machine"] = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    write_all(res, out, res["command"])
    if as_json:
        print_json(public(res))
        return
    _print_tables(res, out)


def _run_workers(chosen, jobs, settings, strategies, no_ablations, no_model_mode, quick, seed, err) -> None:
    """Fill the cache with ``jobs`` child ``lora-merge bench quality`` processes, pairs dealt round-robin."""
    import subprocess
    import sys
    import tempfile

    groups = [chosen[i::jobs] for i in range(jobs) if chosen[i::jobs]]
    scratch = Path(tempfile.mkdtemp(prefix="lora-merge-bench-"))
    procs = []
    for k, group in enumerate(groups):
        cmd = [sys.executable, "-m", "lora_merge", "bench", "quality", "--pairs", ",".join(p.name for p in group),
               "--n", str(settings.n), "--val-n", str(settings.val_n), "--seed", str(seed), "--cache",
               str(settings.cache), "-o", str(scratch / str(k)), "--force", "--json"]
        cmd += (["--strategies", strategies] if strategies else []) + (["--no-ablations"] if no_ablations else [])
        cmd += (["--no-model-mode"] if no_model_mode else []) + (["--quick"] if quick else [])
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    with err.status(f"{len(procs)} workers running {len(chosen)} pairs…"):
        failed = [(p, p.communicate()[1]) for p in procs]
    bad = [(p, e) for p, e in failed if p.returncode != 0]
    if bad:
        proc, stderr = bad[0]
        last = next((ln for ln in reversed((stderr or "").splitlines()) if ln.strip()), "no message")
        raise UsageError(f"a bench worker failed (exit {proc.returncode}): {last.strip()}")


def _print_tables(res: dict, out: Path) -> None:
    from rich.table import Table

    from ..bench.quality import pct

    con = stdout_console()
    con.print(f"judge on fresh renders: shape min {pct(res['judge']['shape_min'])}, style min "
              f"{pct(res['judge']['style_min'])}; base sanity: both {pct(res['sanity']['joint_acc'])}")
    lt = Table(title="each LoRA alone (strength curve on its own prompt; target ≥ 90 % at 1.0, ≥ 60 % at 0.6)")
    lt.add_column("LoRA")
    for c in res["loras"][0]["curve"] if res["loras"] else []:
        lt.add_column(f"×{c['scale']}", justify="right")
    for col in ("target", "leakage", "binding"):
        lt.add_column(col, justify="right")
    for lo in res["loras"]:
        leak = lo.get("leakage") or {}
        lt.add_row(lo["word"], *[pct(c["acc"]) for c in lo["curve"]],
                   "met" if lo["meets_recipe"] else "[red]missed[/]", pct(leak.get("rate")),
                   pct(lo["binding"]["rate"]))
    con.print(lt)
    mt = Table(title=f"mean over {len(res['pairs'])} pairs (joint accuracy, 95 % CI)")
    for col in ("row", "mode", "joint", "CI", "content", "style", "h-mean sim", "/ ceiling"):
        mt.add_column(col, justify="left" if col in ("row", "mode") else "right")
    best = max(res["mean"], key=lambda m: m["joint_acc"] or 0, default=None)
    for m in sorted(res["mean"], key=lambda m: -(m["joint_acc"] or 0)):
        lo, hi = m["joint_ci"]
        style = "bold green" if m is best else None
        mt.add_row(m["label"], m["mode"], pct(m["joint_acc"]), f"{100 * lo:.0f}–{100 * hi:.0f}",
                   pct(m["content_acc"]), pct(m["style_acc"]),
                   "" if m["hmean_sim"] is None else f"{m['hmean_sim']:.2f}",
                   f"{m['joint_acc'] / m['ceiling']:.2f}" if m["ceiling"] else "", style=style)
    con.print(mt)
    df = res["direct_fails"]
    con.print(f"linear (1, 1) below 60 % of the ceiling on {df['count']} of {df['of']} pairs"
              + (f": {', '.join(df['pairs'])}" if df["pairs"] else ""))
    con.print(f"wrote {out / 'quality-results.md'} and the images ({res['seconds'] / 60:.1f} min; "
              f"{res['cache']['hits']} rows from the cache)")
