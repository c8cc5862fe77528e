"""Bar charts of measured layer priors (``lora-merge priors measure --plot``): matplotlib when installed,
else drawn with PIL."""
from __future__ import annotations

from pathlib import Path

from ..files import atomic_write
from ..priors.measured import MeasuredPriors

_ROLE_COLORS = {"content": (52, 101, 164), "style": (204, 0, 102), "neutral": (120, 120, 120)}
_BAR_COLORS = ((52, 101, 164), (204, 0, 102))


def plot_roles(result: MeasuredPriors, path: str | Path, title: str | None = None) -> Path:
    """Bar chart PNG: per group, the fraction of the content and of the style LoRA's effect lost when the
    group is scaled down, and the assigned role.  Uses matplotlib when installed, else draws with PIL."""
    path = Path(path)
    title = title or f"measured layer priors ({result.method}, {result.arch or 'model'})"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        img = _plot_pil(result, title)
        return atomic_write(path, lambda fh: img.save(fh, format="PNG"))
    _plot_matplotlib(result, title, path)
    return path


def _plot_matplotlib(result: MeasuredPriors, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [g.group.name for g in result.groups]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 1.5), 3.6), dpi=120)
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [g.content_lost for g in result.groups], w, label="content lost",
           color=[c / 255 for c in _BAR_COLORS[0]])
    ax.bar([x + w / 2 for x in xs], [g.style_lost for g in result.groups], w, label="style lost",
           color=[c / 255 for c in _BAR_COLORS[1]])
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{g.group.name}\n{g.role}" for g in result.groups], fontsize=8)
    for lbl, g in zip(ax.get_xticklabels(), result.groups):
        lbl.set_color([c / 255 for c in _ROLE_COLORS[g.role]])
    ax.set_ylabel("fraction of the LoRA's effect lost")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)


def _plot_pil(result: MeasuredPriors, title: str):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n = max(1, len(result.groups))
    slot, bar, plot_h, left, top, bottom = 110, 34, 220, 60, 56, 60
    width = max(400, left + slot * n + 20)
    height = top + plot_h + bottom
    vmax = max([1.0] + [max(g.content_lost, g.style_lost) for g in result.groups])
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill=(0, 0, 0), font=font)
    d.rectangle([width - 190, 22, width - 180, 32], fill=_BAR_COLORS[0])
    d.text((width - 175, 21), "content lost", fill=(0, 0, 0), font=font)
    d.rectangle([width - 100, 22, width - 90, 32], fill=_BAR_COLORS[1])
    d.text((width - 85, 21), "style lost", fill=(0, 0, 0), font=font)
    y0 = top + plot_h
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        v = frac * vmax
        y = y0 - int(plot_h * frac)
        d.line([left - 4, y, width - 10, y], fill=(225, 225, 225))
        d.text((8, y - 6), f"{v:.2f}", fill=(60, 60, 60), font=font)
    d.line([left, top, left, y0], fill=(0, 0, 0))
    d.line([left, y0, width - 10, y0], fill=(0, 0, 0))
    for i, g in enumerate(result.groups):
        x = left + slot * i + (slot - 2 * bar) // 2
        for j, v in enumerate((g.content_lost, g.style_lost)):
            h = int(plot_h * max(0.0, v) / vmax)
            d.rectangle([x + j * bar, y0 - h, x + (j + 1) * bar - 4, y0], fill=_BAR_COLORS[j])
            d.text((x + j * bar, y0 - h - 12), f"{v:.2f}", fill=(0, 0, 0), font=font)
        d.text((left + slot * i + 6, y0 + 8), g.group.name[:18], fill=(0, 0, 0), font=font)
        d.text((left + slot * i + 6, y0 + 24), f"{g.role} ({g.score:+.2f})", fill=_ROLE_COLORS[g.role], font=font)
    return img
