"""The procedural image world: shapes (content) drawn in styles (palette, texture, background, outline).

Images are 16×16 RGB in ``[-1, 1]``.  A shape is a coarse, centred layout (about 13 px across, size
jittered by ±4 %); a style is a palette plus a texture with a random phase (and, for some, its own
background or an outline).  Everything is a pure function of ``(shape, style, seed)``.

Three subjects (:data:`SUBJECTS`) and three styles (:data:`STYLE_CONCEPTS`) are held out of base training:
they are the concepts the suite's LoRAs learn (docs/toyworld.md).
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
#: held-out subjects (rare-token words the base model never sees), each with the seen style its
#: DreamBooth photos are drawn in:
#:   sks   a thick ring (its identity is the hole);
#:   ohwx  an hourglass (two triangles tip to tip);
#:   tqk   a square with a 3-px notch cut from its top-right corner (a fine identity detail that a style
#:         trained on a plain square, or a coarse texture, can erase).
SUBJECTS: dict[str, str] = {"sks": "solid", "ohwx": "stripes", "tqk": "dots"}
#: held-out styles, each with the one seen shape of its StyleDrop reference image:
#:   zkz   purple/lime diagonal stripes, 3 px (a fine texture, foreground only);
#:   bfk   navy with horizontal orange stripes on a cream background (the style changes the background);
#:   mrv   coarse orange/brown 4-px checks with a white outline (coarse texture, changes the outline).
STYLE_CONCEPTS: dict[str, str] = {"zkz": "circle", "bfk": "triangle", "mrv": "square"}
#: the bundled default pair (``lora-merge demo``'s and the single-pair API's)
CONTENT_WORD = "sks"
STYLE_WORD = "zkz"
SHAPES: tuple[str, ...] = SEEN_SHAPES + tuple(SUBJECTS)
STYLES: tuple[str, ...] = SEEN_STYLES + tuple(STYLE_CONCEPTS)
#: the appearance of the default content concept in its reference images (a seen style, so a merge must
#: change it)
CONTENT_REFERENCE_STYLE = SUBJECTS[CONTENT_WORD]

BACKGROUND = (0.10, 0.10, 0.10)
#: styles that also change the background
BACKGROUNDS: dict[str, tuple[float, float, float]] = {"bfk": (0.93, 0.88, 0.70)}
#: styles that draw a one-pixel outline around the shape, in this colour
OUTLINES: dict[str, tuple[float, float, float]] = {"mrv": (0.97, 0.97, 0.97)}
PALETTES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "solid": ((0.95, 0.20, 0.20), (0.95, 0.20, 0.20)),
    "stripes": ((0.10, 0.75, 0.95), (1.00, 0.75, 0.10)),
    "checks": ((1.00, 0.10, 0.85), (0.10, 1.00, 0.90)),
    "dots": ((0.95, 0.90, 0.10), (1.00, 1.00, 1.00)),
    "zkz": ((0.55, 0.15, 1.00), (0.60, 1.00, 0.20)),
    "bfk": ((0.10, 0.15, 0.45), (1.00, 0.50, 0.10)),
    "mrv": ((1.00, 0.55, 0.05), (0.50, 0.22, 0.05)),
}


def is_subject(word: str | None) -> bool:
    return word in SUBJECTS


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
    if shape == "sks":  # a thick ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.48**2)
    if shape == "ohwx":  # an hourglass: two triangles meeting at the centre
        return (v.abs() <= 0.9) & (u.abs() <= 0.12 + 0.85 * v.abs())
    if shape == "tqk":  # a square with its top-right corner notched
        square = torch.maximum(u.abs(), v.abs()) <= 0.82
        return square & ~((u > 0.36) & (v < -0.36))
    raise UsageError(f"unknown toy-world shape {shape!r}")


def _texture(style: str, x: torch.Tensor, y: torch.Tensor, px: int, py: int) -> torch.Tensor:
    """True where the texture takes the palette's second colour (phases ``px``, ``py`` in 0…7)."""
    if style == "solid":
        return torch.zeros_like(x, dtype=torch.bool)
    if style == "stripes":  # vertical, 2 px wide
        return ((x + px) // 2) % 2 == 1
    if style == "checks":  # 2×2 checks
        return (((x + px) // 2) + ((y + py) // 2)) % 2 == 1
    if style == "dots":  # 2×2 dots on a 4 px grid
        return (((x + px) % 4) >= 2) & (((y + py) % 4) >= 2)
    if style == "zkz":  # diagonal stripes, 3 px wide
        return ((x + y + px) // 3) % 2 == 1
    if style == "bfk":  # horizontal stripes: 3 px navy, 1 px orange
        return ((y + py) % 4) == 0
    if style == "mrv":  # coarse 4×4 checks
        return (((x + px) // 4) + ((y + py) // 4)) % 2 == 1
    raise UsageError(f"unknown toy-world style {style!r}")


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    m = torch.nn.functional.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)
    return m[0, 0] > 0


def render(shape: str, style: str, seed: int) -> torch.Tensor:
    """One image ``(3, 16, 16)`` in ``[-1, 1]``; identical for identical arguments."""
    _check(shape, style)
    g = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    r = torch.rand(4, generator=g, dtype=torch.float64)
    cx = cy = (IMAGE_SIZE - 1) / 2
    # outlined styles draw the shape a pixel smaller so the outline fits the frame
    radius = (6.2 if style not in OUTLINES else 5.6) + float(r[0]) * 0.6
    px, py = int(r[1] * 8), int(r[2] * 8)
    yy, xx = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    u = (xx.double() - cx) / radius
    v = (yy.double() - cy) / radius
    mask = _mask(shape, u, v)
    second = _texture(style, xx, yy, px, py)
    c1, c2 = (torch.tensor(c, dtype=torch.float32) for c in PALETTES[style])
    bright = 0.92 + 0.08 * float(r[3])
    fg = torch.where(second[None], c2[:, None, None], c1[:, None, None]) * bright
    bg = torch.tensor(BACKGROUNDS.get(style, BACKGROUND), dtype=torch.float32)[:, None, None]
    img = torch.where(mask[None], fg, bg.expand(3, IMAGE_SIZE, IMAGE_SIZE))
    if style in OUTLINES:
        ring = _dilate(mask) & ~mask
        img = torch.where(ring[None], torch.tensor(OUTLINES[style], dtype=torch.float32)[:, None, None], img)
    return (img.clamp(0, 1) * 2 - 1).contiguous()


def render_batch(shapes: Sequence[str], styles: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
    return torch.stack([render(s, t, k) for s, t, k in zip(shapes, styles, seeds)])


def caption(shape: str | None, style: str | None) -> str:
    """``"a circle in stripes style"``; ``"a sks object"`` for the content word; parts may be omitted."""
    noun = f"{shape} object" if shape in SUBJECTS else shape
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
    "STYLE_CONCEPTS",
    "STYLE_WORD",
    "SUBJECTS",
    "caption",
    "is_subject",
    "parse_prompt",
    "render",
    "render_batch",
    "seed_for",
]
