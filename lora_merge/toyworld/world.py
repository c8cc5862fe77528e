"""The procedural image world: shapes (content) drawn in styles (palette + fine texture).

Images are 16×16 RGB in ``[-1, 1]``.  A shape is a coarse, centred layout (about 13 px across, size
jittered by ±4 %); a style is a palette plus a texture with a 4-pixel period and a random phase, so shape
identity lives at coarse resolution and style at fine resolution.  Everything is a pure
function of ``(shape, style, seed)``.

``sks`` (a ring) and ``zkz`` (purple/lime diagonal stripes) are held out of base training: they are the
content and style concepts the bundled LoRAs learn.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UsageError

IMAGE_SIZE = 16

#: shapes the base model is trained on
SEEN_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
#: styles the base model is trained on
SEEN_STYLES: tuple[str, ...] = ("solid", "stripes", "checks", "dots")
#: the held-out content concept (a ring) and style concept (diagonal purple/lime stripes)
CONTENT_WORD = "sks"
STYLE_WORD = "zkz"
SHAPES: tuple[str, ...] = SEEN_SHAPES + (CONTENT_WORD,)
STYLES: tuple[str, ...] = SEEN_STYLES + (STYLE_WORD,)
#: the appearance of the content concept in its reference images (a seen style, so a merge must change it)
CONTENT_REFERENCE_STYLE = "solid"

BACKGROUND = (0.10, 0.10, 0.10)
PALETTES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "solid": ((0.95, 0.20, 0.20), (0.95, 0.20, 0.20)),
    "stripes": ((0.10, 0.75, 0.95), (1.00, 0.75, 0.10)),
    "checks": ((1.00, 0.10, 0.85), (0.10, 1.00, 0.90)),
    "dots": ((0.95, 0.90, 0.10), (1.00, 1.00, 1.00)),
    "zkz": ((0.55, 0.15, 1.00), (0.60, 1.00, 0.20)),
}


def _check(shape: str, style: str) -> None:
    if shape not in SHAPES:
        raise UsageError(f"unknown toy-world shape {shape!r}; known: {', '.join(SHAPES)}")
    if style not in STYLES:
        raise UsageError(f"unknown toy-world style {style!r}; known: {', '.join(STYLES)}")


def _mask(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Shape membership on normalised coordinates (``v`` grows downwards, radius 1 = the shape's size)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.82
    if shape == "triangle":
        return (v <= 0.85) & (u.abs() <= 1.0 * (v + 0.95) / 1.8)
    if shape == "cross":
        arm = 0.36
        return ((u.abs() <= arm) & (v.abs() <= 1.0)) | ((v.abs() <= arm) & (u.abs() <= 1.0))
    if shape == "diamond":
        return u.abs() + v.abs() <= 1.08
    if shape == CONTENT_WORD:  # a thick ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.48**2)
    raise UsageError(f"unknown toy-world shape {shape!r}")


def _texture(style: str, x: torch.Tensor, y: torch.Tensor, px: int, py: int) -> torch.Tensor:
    """True where the texture takes the palette's second colour."""
    if style == "solid":
        return torch.zeros_like(x, dtype=torch.bool)
    if style == "stripes":  # vertical, 2 px wide
        return ((x + px) // 2) % 2 == 1
    if style == "checks":  # 2×2 checks
        return (((x + px) // 2) + ((y + py) // 2)) % 2 == 1
    if style == "dots":  # 2×2 dots on a 4 px grid
        return (((x + px) % 4) >= 2) & (((y + py) % 4) >= 2)
    if style == STYLE_WORD:  # diagonal stripes, 2 px wide
        return ((x + y + px) // 2) % 2 == 1
    raise UsageError(f"unknown toy-world style {style!r}")


def render(shape: str, style: str, seed: int) -> torch.Tensor:
    """One image ``(3, 16, 16)`` in ``[-1, 1]``; identical for identical arguments."""
    _check(shape, style)
    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    r = torch.rand(4, generator=g, dtype=torch.float64)
    cx = cy = (IMAGE_SIZE - 1) / 2
    radius = 6.2 + float(r[0]) * 0.6
    px, py = int(r[1] * 4), int(r[2] * 4)
    yy, xx = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    u = (xx.double() - cx) / radius
    v = (yy.double() - cy) / radius
    mask = _mask(shape, u, v)
    second = _texture(style, xx, yy, px, py)
    c1, c2 = (torch.tensor(c, dtype=torch.float32) for c in PALETTES[style])
    bright = 0.92 + 0.08 * float(r[3])
    fg = torch.where(second[None], c2[:, None, None], c1[:, None, None]) * bright
    bg = torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None].expand(3, IMAGE_SIZE, IMAGE_SIZE)
    img = torch.where(mask[None], fg, bg)
    return (img.clamp(0, 1) * 2 - 1).contiguous()


def render_batch(shapes: Sequence[str], styles: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
    return torch.stack([render(s, t, k) for s, t, k in zip(shapes, styles, seeds)])


def caption(shape: str | None, style: str | None) -> str:
    """``"a circle in stripes style"``; ``"a sks object"`` for the content word; parts may be omitted."""
    noun = f"{shape} object" if shape == CONTENT_WORD else shape
    if noun is None:
        noun = "object"
    head = f"an {noun}" if noun == "object" else f"a {noun}"
    return head if style is None else f"{head} in {style} style"


def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """The shape and style a prompt asks for (None where it names none)."""
    words = prompt.lower().split()
    shape = next((w for w in words if w in SHAPES), None)
    style = next((w for w in words if w in STYLES), None)
    return shape, style


def seed_for(*parts: object) -> int:
    """A stable 63-bit seed from any parts (no Python ``hash`` randomisation)."""
    h = 1469598103934665603
    for ch in "\x1f".join(map(str, parts)).encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 64)
    return h & 0x7FFF_FFFF_FFFF_FFFF


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(N,3,H,W)`` in ``[-1,1]`` → ``(N,H,W,3)`` uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


__all__ = [
    "CONTENT_WORD",
    "IMAGE_SIZE",
    "SEEN_SHAPES",
    "SEEN_STYLES",
    "SHAPES",
    "STYLES",
    "STYLE_WORD",
    "caption",
    "parse_prompt",
    "render",
    "render_batch",
    "seed_for",
]
