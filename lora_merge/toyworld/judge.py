"""The judge: a small CNN with a shape head and a style head, trained on augmented renders.

Augmentations mimic what diffusion samples look like next to clean renders: ragged edges (random
one-pixel displacements), colour casts, background tints, blur and noise, one-pixel translations.
It classifies every shape and style of the world, the held-out ``sks`` and ``zkz`` included.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..files import atomic_write, atomic_write_json
from . import world
from .model import DATA_DIR


class JudgeNet(nn.Module):
    """A shared conv trunk, then one 64-wide embedding per head: the shape embedding is the suite's
    subject-similarity feature (a DINO stand-in), the style embedding its style feature (a CSD stand-in)."""

    def __init__(self, n_shapes: int, n_styles: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * (world.IMAGE_SIZE // 4) ** 2, 128), nn.ReLU(),
        )
        self.shape_embed = nn.Sequential(nn.Linear(128, 64), nn.ReLU())
        self.style_embed = nn.Sequential(nn.Linear(128, 64), nn.ReLU())
        self.shape_head = nn.Linear(64, n_shapes)
        self.style_head = nn.Linear(64, n_styles)

    def embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.shape_embed(h), self.style_embed(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.embeddings(x)
        return self.shape_head(a), self.style_head(b)


@dataclass
class Judge:
    net: JudgeNet
    shapes: list[str]
    styles: list[str]
    info: dict

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(images.float().clamp(-1, 1).cpu())

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shape_features, style_features)``, each ``(N, 64)``: the similarity features."""
        return self.net.embeddings(images.float().clamp(-1, 1).cpu())

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shape_idx, style_idx)`` for ``(N,3,H,W)`` images in ``[-1,1]``."""
        a, b = self.logits(images)
        return a.argmax(1), b.argmax(1)

    def predict_names(self, images: torch.Tensor) -> list[tuple[str, str]]:
        s, t = self.predict(images)
        return [(self.shapes[i], self.styles[j]) for i, j in zip(s.tolist(), t.tolist())]


# ---------------------------------------------------------------- augmentation

def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    k = torch.arange(-1, 2, dtype=x.dtype)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    w = w / w.sum(1, keepdim=True)  # (N, 3)
    _n, _c, h, wd = x.shape
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    # separable: rows then columns, per-sample kernels
    rows = sum(w[:, i, None, None, None] * xp[:, :, :, i : i + wd] for i in range(3))
    return sum(w[:, i, None, None, None] * rows[:, :, i : i + h, :] for i in range(3))


def _ragged(x: torch.Tensor, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Replace each pixel, with probability p, by a random 4-neighbour (ragged edges, broken texture)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    shifts = [xp[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
    choice = torch.randint(0, 4, (n, 1, h, w), generator=g)
    nb = torch.stack(shifts, 0).gather(0, choice[None].expand(1, n, c, h, w))[0]
    take = torch.rand(n, 1, h, w, generator=g) < p[:, None, None, None]
    return torch.where(take, nb, x)


def augment(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    n = x.shape[0]
    r = lambda *s: torch.rand(*s, generator=g)
    shift = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(2, 3))
    x = _ragged(x, strength * 0.25 * r(n), g)
    x = (x + 1) / 2
    x = x * (1 + strength * 0.3 * (r(n, 3, 1, 1) - 0.5)) + strength * 0.16 * (r(n, 3, 1, 1) - 0.5)
    x = _blur(x, strength * 0.9 * r(n))
    x = x + strength * 0.12 * r(n, 1, 1, 1) * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 2 - 1)


def _batch(n: int, g: torch.Generator, salt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    si = torch.randint(0, len(world.SHAPES), (n,), generator=g)
    ti = torch.randint(0, len(world.STYLES), (n,), generator=g)
    seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
    imgs = world.render_batch([world.SHAPES[i] for i in si], [world.STYLES[i] for i in ti],
                              [world.seed_for(salt, s) for s in seeds])
    return imgs, si, ti


def per_class_accuracy(judge: Judge, n_per_class: int = 100, seed: int = 12345, strength: float = 0.0) -> dict:
    """Accuracy on fresh renders (seeds never used in training), per shape and per style."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {"shape": {}, "style": {}}
    for head, names in (("shape", world.SHAPES), ("style", world.STYLES)):
        for k, name in enumerate(names):
            other = world.STYLES if head == "shape" else world.SHAPES
            imgs = []
            for i in range(n_per_class):
                o = other[i % len(other)]
                sh, st = (name, o) if head == "shape" else (o, name)
                imgs.append(world.render(sh, st, world.seed_for("judge-eval", seed, sh, st, i)))
            x = torch.stack(imgs)
            if strength > 0:
                x = augment(x, g, strength)
            s, t = judge.predict(x)
            pred = s if head == "shape" else t
            out[head][name] = float((pred == k).float().mean())
    return out


def train_judge(out: Path = DATA_DIR, steps: int = 1500, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                log: Callable[[str], None] = print) -> Path:
    from safetensors.torch import save

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = JudgeNet(len(world.SHAPES), len(world.STYLES))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * (1 - step / steps))
        x, si, ti = _batch(batch, g, f"judge-train-{seed}")
        x = augment(x, g, 1.0 if step % 4 else 0.3)
        a, b = net(x)
        loss = F.cross_entropy(a, si) + F.cross_entropy(b, ti)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"judge step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    net.eval()
    judge = Judge(net, list(world.SHAPES), list(world.STYLES), {})
    clean = per_class_accuracy(judge, strength=0.0)
    aug = per_class_accuracy(judge, strength=1.0, seed=54321)
    info = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "heldout_clean": clean, "heldout_augmented": aug}
    log(json.dumps(info, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / "judge.safetensors", lambda fh: fh.write(save(state)))
    cfg = {"shapes": list(world.SHAPES), "styles": list(world.STYLES), "width": 32, "training": info}
    atomic_write_json(out / "judge.json", cfg)
    return out / "judge.safetensors"


def load_judge(path: str | Path | None = None) -> Judge:
    from safetensors.torch import load_file

    d = Path(path) if path is not None else DATA_DIR
    if not (d / "judge.safetensors").is_file():
        raise UsageError(f"{d / 'judge.safetensors'}: toy-world judge not found (train it with "
                         "`lora-merge toyworld train-judge`)")
    cfg = json.loads((d / "judge.json").read_text())
    net = JudgeNet(len(cfg["shapes"]), len(cfg["styles"]), cfg.get("width", 32))
    net.load_state_dict({k: v.float() for k, v in load_file(str(d / "judge.safetensors")).items()})
    net.eval().requires_grad_(False)
    return Judge(net, cfg["shapes"], cfg["styles"], cfg.get("training", {}))
