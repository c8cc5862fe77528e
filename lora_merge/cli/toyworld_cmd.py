"""``lora-merge toyworld``: train (from scratch, seeded) and render the bundled toy world."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError


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
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default: package data).")
@click.option("--steps", default=1200, show_default=True)
@click.option("--batch", default=48, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None, help="Also append the log here.")
def train_base_cmd(out, steps, batch, lr, seed, log_path) -> None:
    """Train the base text encoder + UNet from scratch on seen shapes × seen styles."""
    from ..toyworld.model import DATA_DIR
    from ..toyworld.train import train_base

    train_base(out or DATA_DIR / "base", steps=steps, batch=batch, lr=lr, seed=seed, log=_log_to(log_path))


@toyworld.command("train-loras")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: the package's data/toyworld/loras).")
@click.option("--steps", type=int, default=None, help="Training steps (default: the recipe's: 2000 for a subject, 1000 for a style).")
@click.option("--lr", type=float, default=None, help="AdamW learning rate (default: the recipe's).")
@click.option("--seed", default=0, show_default=True)
@click.option("--only", default=None, metavar="WORD[,WORD...]",
              help="Train only these concepts (subjects: sks, ohwx, tqk; styles: zkz, bfk, mrv).")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None, help="Also append the log here.")
def train_loras_cmd(out, steps, lr, seed, only, log_path) -> None:
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
        train_lora(word, out or LORA_DIR, steps=steps, lr=lr, seed=seed, log=_log_to(log_path))


@toyworld.command("train-judge")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default: package data).")
@click.option("--steps", default=1500, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None, help="Also append the log here.")
def train_judge_cmd(out, steps, seed, log_path) -> None:
    """Train the shape/style judge on augmented renders of every shape and style."""
    from ..toyworld.judge import train_judge
    from ..toyworld.model import DATA_DIR

    train_judge(out or DATA_DIR, steps=steps, seed=seed, log=_log_to(log_path))
