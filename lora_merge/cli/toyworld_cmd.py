"""``lora-merge toyworld``: train (from scratch, seeded) and render the bundled toy world."""
from __future__ import annotations

from pathlib import Path

import click


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
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default: package data).")
@click.option("--steps", default=400, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--only", type=click.Choice(["content", "style"]), default=None, help="Train one LoRA only.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None, help="Also append the log here.")
def train_loras_cmd(out, steps, seed, only, log_path) -> None:
    """Train the content ("a sks object") and style ("in zkz style") LoRAs on the bundled base (UNet only)."""
    from ..toyworld.model import DATA_DIR
    from ..toyworld.train import train_lora

    for concept in [only] if only else ["content", "style"]:
        train_lora(concept, out or DATA_DIR, steps=steps, seed=seed, log=_log_to(log_path))


@toyworld.command("train-judge")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output folder (default: package data).")
@click.option("--steps", default=1000, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None, help="Also append the log here.")
def train_judge_cmd(out, steps, seed, log_path) -> None:
    """Train the shape/style judge on augmented renders of every shape and style."""
    from ..toyworld.judge import train_judge
    from ..toyworld.model import DATA_DIR

    train_judge(out or DATA_DIR, steps=steps, seed=seed, log=_log_to(log_path))
