"""``lora-merge toyworld``: train (from scratch, seeded) and render the bundled toy world."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError
from .common import output_option


def _log_to(path: Path | None):
    fh = open(path, "a", buffering=1) if path else None  # noqa: SIM115

    def log(msg: str) -> None:
        click.echo(msg)
        if fh:
            fh.write(msg + "\n")

    return log


@click.group("toyworld")
def toyworld() -> None:
    """The toy SDXL-shaped text-to-image world: retrain its bundled weights (base, LoRAs, judge).

    The package ships trained weights; these commands reproduce them (seeded, CPU, 10-20 minutes for
    the base model, about two minutes per LoRA, a few minutes for the judge)."""


@toyworld.command("train-base")
@output_option("Output folder (default: the package data; --out is the older spelling).", extra=("--out",),
               type=click.Path(path_type=Path), default=None)
@click.option("--steps", default=1200, show_default=True, help="Training steps.")
@click.option("--batch", default=48, show_default=True, help="Batch size.")
@click.option("--lr", default=2e-3, show_default=True, help="AdamW learning rate.")
@click.option("--seed", default=0, show_default=True, help="Training seed.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
              help="Also append the log to this file (default: stdout only).")
def train_base_cmd(output, steps, batch, lr, seed, log_path) -> None:
    """Train the base text encoder + UNet from scratch on seen shapes × seen styles."""
    from ..toyworld.model import DATA_DIR
    from ..toyworld.train import train_base

    train_base(output or DATA_DIR / "base", steps=steps, batch=batch, lr=lr, seed=seed, log=_log_to(log_path))


@toyworld.command("train-loras")
@output_option("Output folder (default: the package's data/toyworld/loras; --out is the older spelling).",
               extra=("--out",), type=click.Path(path_type=Path), default=None)
@click.option("--steps", type=int, default=None, help="Training steps (default: the recipe's: 2000 for a subject, 1000 for a style).")
@click.option("--lr", type=float, default=None, help="AdamW learning rate (default: the recipe's).")
@click.option("--seed", default=0, show_default=True, help="Training seed.")
@click.option("--only", default=None, metavar="WORD[,WORD...]",
              help="Train only these concepts (subjects: sks, ohwx, tqk; styles: zkz, bfk, mrv; default: all).")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
              help="Also append the log to this file (default: stdout only).")
def train_loras_cmd(output, steps, lr, seed, only, log_path) -> None:
    """Train the suite's LoRAs on the bundled base (UNet only): one DreamBooth LoRA per held-out subject
    (6 photos in one seen style, "a sks object") and one StyleDrop LoRA per held-out style (one reference
    image of one seen shape, augmented)."""
    from ..toyworld import world
    from ..toyworld.train import LORA_DIR, train_lora

    words = list(world.SUBJECTS) + list(world.STYLE_CONCEPTS)
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in words]
        if unknown:
            raise UsageError(f"--only: unknown concept {unknown[0]!r}; known: {', '.join(words)}")
        words = wanted
    for word in words:
        train_lora(word, output or LORA_DIR, steps=steps, lr=lr, seed=seed, log=_log_to(log_path))


@toyworld.command("train-judge")
@output_option("Output folder (default: the package data; --out is the older spelling).", extra=("--out",),
               type=click.Path(path_type=Path), default=None)
@click.option("--steps", default=1500, show_default=True, help="Training steps.")
@click.option("--seed", default=0, show_default=True, help="Training seed.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None,
              help="Also append the log to this file (default: stdout only).")
def train_judge_cmd(output, steps, seed, log_path) -> None:
    """Train the shape/style judge on augmented renders of every shape and style."""
    from ..toyworld.judge import train_judge
    from ..toyworld.model import DATA_DIR

    train_judge(output or DATA_DIR, steps=steps, seed=seed, log=_log_to(log_path))
