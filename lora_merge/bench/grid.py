"""Labelled PNG grids of toy-world samples: ``lora-merge demo``'s picture and ``bench quality``'s per-pair
grids.

A grid is one row of images per :class:`GridRow`, with a label block on the left (the row's label and
smaller note lines under it) and, when ``columns`` are given, a score table on the right whose cells are
the strings the caller's terminal table prints.  A title and lines under it explain the picture; the rows
marked ``best`` get a coloured frame and a "BEST" tag.

Every string is measured with the font's own metrics (``ImageDraw.textlength``/``textbbox``) and wrapped
at spaces, or drawn smaller, until it fits its box; a word wider than the box at the smallest size is
split.  :func:`render_grid` returns the picture together with every line it drew and the box that line had
to fit (:class:`DrawnText`), so what the picture says can be checked without reading pixels.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..files import atomic_write, make_dirs
from ..toyworld import world

#: the frame, tag and label background of a ``best`` row
BEST_COLOR = (0, 140, 60)
BEST_FILL = (226, 245, 232)
INK = (20, 20, 20)
GREY = (90, 90, 90)
RULE = (215, 215, 215)
#: characters the bundled font has no glyph for, drawn as these
_GLYPHS = {"\u2014": "-", "\u2013": "-", "\u00d7": "x", "\u2190": "<-", "\u2192": "->", "\u2605": "*"}


@dataclass
class Column:
    """One score column: its header and how its cells sit (``wrap``: left-aligned text wrapped to
    ``width`` pixels; otherwise right-aligned and as wide as its widest cell)."""

    header: str
    wrap: bool = False
    width: int = 170


@dataclass
class GridRow:
    """One row: ``images`` ``(N, 3, H, W)`` in ``[-1, 1]`` (or ``(N, H, W, 3)`` uint8), its label, note lines
    under the label, one cell per :class:`Column`, and whether it is the row to point at."""

    label: str
    images: Any
    notes: Sequence[str] = ()
    cells: Sequence[str] = ()
    best: bool = False


@dataclass(frozen=True)
class DrawnText:
    """One line of text as drawn: where, how wide (measured), the box it had to fit, its role (``title``,
    ``subtitle``, ``label``, ``note``, ``header``, ``cell``, ``tag``, ``footer``), the row it belongs to
    (None: none) and the font size."""

    text: str
    xy: tuple[int, int]
    width: int
    box: tuple[int, int, int, int]
    role: str
    row: int | None
    size: int

    @property
    def fits(self) -> bool:
        x0, _, x1, _ = self.box
        return self.xy[0] >= x0 and self.xy[0] + self.width <= x1


@dataclass
class Grid:
    """A rendered grid: the image, every line of text drawn, each row's box and the best rows' frames."""

    image: Any
    texts: list[DrawnText] = field(default_factory=list)
    row_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    best_rows: list[int] = field(default_factory=list)

    def lines(self, role: str | None = None, row: int | None = None) -> list[str]:
        """The drawn lines, optionally of one role and/or one row."""
        return [t.text for t in self.texts if (role is None or t.role == role) and (row is None or t.row == row)]

    def text(self, role: str | None = None, row: int | None = None) -> str:
        """The drawn lines joined by spaces (a wrapped string reads as it was given)."""
        return " ".join(self.lines(role, row))


# ------------------------------------------------------------------------------------------ fonts
@cache
def font(size: int):
    """Pillow's bundled font at ``size`` px (a fixed-size bitmap font on Pillow without FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _size(f) -> int:
    return int(getattr(f, "size", 11))


def line_height(f) -> int:
    return math.ceil(_size(f) * 1.3)


def text_width(draw, text: str, f) -> int:
    """Pixels ``text`` takes when drawn with ``f`` (the advance or the ink, whichever reaches further)."""
    if not text:
        return 0
    adv = draw.textlength(text, font=f)
    ink = draw.textbbox((0, 0), text, font=f)[2]
    return math.ceil(max(adv, ink))


def _safe(text: str) -> str:
    return "".join(_GLYPHS.get(ch, ch) for ch in text)


def wrap(draw, text: str, f, width: int, break_words: bool = False) -> list[str] | None:
    """``text`` in lines of at most ``width`` px, broken at spaces (None: a word alone is wider, unless
    ``break_words``, which splits such a word between characters)."""
    lines: list[str] = []
    cur = ""
    for word in text.split():
        trial = f"{cur} {word}" if cur else word
        if text_width(draw, trial, f) <= width:
            cur = trial
            continue
        if cur:
            lines.append(cur)
        cur = word
        if text_width(draw, word, f) > width:
            if not break_words:
                return None
            piece = ""
            for ch in word:
                if piece and text_width(draw, piece + ch, f) > width:
                    lines.append(piece)
                    piece = ""
                piece += ch
            cur = piece
    if cur:
        lines.append(cur)
    return lines


def fit(draw, text: str, width: int, size: int, min_size: int | None = None,
        max_lines: int | None = None) -> tuple[list[str], Any]:
    """The lines and font that fit ``text`` into ``width`` px: the largest size from ``size`` down to
    ``min_size`` at which it wraps at spaces into at most ``max_lines`` lines; else the smallest size,
    wrapped into as many lines as it takes.  A newline in ``text`` always starts a new line."""
    paras = [_safe(" ".join(p.split())) for p in text.split("\n")]
    lo = min_size or max(8, size - 3)

    def lay(f, break_words: bool = False) -> list[str] | None:
        out: list[str] = []
        for p in paras:
            lines = wrap(draw, p, f, width, break_words)
            if lines is None:
                return None
            out += lines
        return out

    for s in range(size, lo - 1, -1):
        f = font(s)
        lines = lay(f)
        if lines is not None and (max_lines is None or len(lines) <= max_lines):
            return lines, f
        if _size(f) != s:  # a fixed-size font: no smaller size to try
            break
    f = font(lo)
    return lay(f, break_words=True) or [""], f


def _to_uint8(images):
    import torch

    t = torch.as_tensor(images)
    if t.dtype == torch.uint8 and t.ndim == 4 and t.shape[-1] == 3:
        return t.numpy()
    return world.to_uint8(t).numpy()


# ----------------------------------------------------------------------------------------- render
def render_grid(rows: Sequence[GridRow], *, title: str | None = None, subtitle: Sequence[str] = (),
                columns: Sequence[Column] = (), footer: Sequence[str] = (), images_header: str | None = None,
                zoom: int = 4, max_cols: int = 16, label_width: int | None = None, best_tag: str = "BEST") -> Grid:
    """Draw ``rows`` (see the module's docstring); ``label_width``: the label block's width in px (default:
    the widest label, 120–300 px).  Returns the :class:`Grid`."""
    from PIL import Image, ImageDraw

    if not rows:
        raise UsageError("nothing to draw")
    for r in rows:
        if len(r.cells) != len(columns):
            raise ValueError(f"row {r.label!r}: {len(r.cells)} cells for {len(columns)} columns")
    margin, gap, pad, row_pad = 12, 14, 2, 6
    label_size, note_size, cell_size, head_size = 15, 12, 15, 12
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    imgs = [_to_uint8(r.images) for r in rows]
    tile = int(imgs[0].shape[1]) * zoom
    cols = min(max_cols, max(int(a.shape[0]) for a in imgs))
    if label_width is None:
        widest = max(text_width(scratch, _safe(r.label), font(label_size)) for r in rows)
        label_width = max(120, min(300, widest + 8))
    # score columns: a fixed width for wrapped ones, else the widest of header and cells
    col_w = []
    for j, c in enumerate(columns):
        if c.wrap:
            col_w.append(c.width)
        else:
            cells = [_safe(r.cells[j]) for r in rows]
            col_w.append(max([text_width(scratch, _safe(c.header), font(head_size))]
                             + [text_width(scratch, s, font(cell_size)) for s in cells]) + 4)
    col_gap = 16
    scores_w = sum(col_w) + col_gap * max(0, len(col_w) - 1)
    images_x = margin + label_width + gap
    images_w = cols * (tile + pad) - pad
    scores_x = images_x + images_w + gap
    width = scores_x + scores_w + margin if columns else images_x + images_w + margin

    inner = width - 2 * margin
    y = margin
    heads: list[tuple[str, list[str], Any, int, int, int]] = []
    top_plan: list[tuple[str, list[str], Any, int, int]] = []
    if title:
        lines, f = fit(scratch, title, inner, 22, min_size=16)
        top_plan.append(("title", lines, f, margin, inner))
    for s in subtitle:
        lines, f = fit(scratch, s, inner, 13, min_size=11)
        top_plan.append(("subtitle", lines, f, margin, inner))
    for role, lines, f, _, _ in top_plan:
        y += len(lines) * line_height(f) + (6 if role == "title" else 2)
    if top_plan:
        y += 6
    # column headers (over the images and each score column)
    head_h = 0
    if images_header or columns:
        if images_header:
            lines, f = fit(scratch, images_header, images_w, head_size, min_size=10)
            heads.append(("header", lines, f, images_x, images_w, 0))
            head_h = max(head_h, len(lines) * line_height(f))
        x = scores_x
        for c, w in zip(columns, col_w):
            lines, f = fit(scratch, c.header, w, head_size, min_size=9)
            heads.append(("header", lines, f, x, w, 1 if not c.wrap else 0))
            head_h = max(head_h, len(lines) * line_height(f))
            x += w + col_gap
    heads_y = y
    y += head_h + (4 if head_h else 0)

    # rows: label block, images, cells; a row is as tall as its tallest part
    row_plans = []
    tag_f = font(12)
    tag_h = line_height(tag_f) + 4
    for i, r in enumerate(rows):
        parts = []
        lines, f = fit(scratch, r.label, label_width, label_size, min_size=11, max_lines=2)
        parts.append(("label", lines, f, margin, label_width, 0, INK))
        for note in r.notes:
            lines, f = fit(scratch, note, label_width, note_size, min_size=10, max_lines=3)
            parts.append(("note", lines, f, margin, label_width, 0, GREY))
        left_h = sum(len(p[1]) * line_height(p[2]) for p in parts) + (tag_h + 4 if r.best else 0)
        cells = []
        x = scores_x
        for j, (c, w) in enumerate(zip(columns, col_w)):
            size = note_size if c.wrap else cell_size
            lines, f = fit(scratch, r.cells[j], w, size, min_size=9)
            cells.append(("cell", lines, f, x, w, 0 if c.wrap else 1, BEST_COLOR if r.best else INK))
            x += w + col_gap
        cell_h = max([len(p[1]) * line_height(p[2]) for p in cells], default=0)
        h = max(tile, left_h, cell_h) + 2 * row_pad
        row_plans.append((y, h, parts, cells, left_h))
        y += h
    y += 6
    foot = []
    for s in footer:
        lines, f = fit(scratch, s, inner, 12, min_size=10)
        foot.append(("footer", lines, f, margin, inner))
        y += len(lines) * line_height(f)
    height = y + margin

    # draw
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    grid = Grid(canvas)

    def put(role: str, lines: list[str], f, x0: int, w: int, y0: int, row: int | None, fill,
            right: bool = False) -> int:
        for ln in lines:
            tw = text_width(draw, ln, f)
            x = x0 + w - tw if right else x0
            draw.text((x, y0), ln, fill=fill, font=f)
            grid.texts.append(DrawnText(ln, (x, y0), tw, (x0, y0, x0 + w, y0 + line_height(f)), role, row,
                                        _size(f)))
            y0 += line_height(f)
        return y0

    ty = margin
    for role, lines, f, x0, w in top_plan:
        ty = put(role, lines, f, x0, w, ty, None, INK if role == "title" else GREY) + (6 if role == "title" else 2)
    for role, lines, f, x0, w, right in heads:
        put(role, lines, f, x0, w, heads_y + head_h - len(lines) * line_height(f), None, GREY, bool(right))
    for i, (r, a, (ry, h, parts, cells, left_h)) in enumerate(zip(rows, imgs, row_plans)):
        box = (margin // 2, ry, width - margin // 2, ry + h)
        grid.row_boxes.append(box)
        if r.best:
            draw.rectangle([box[0], box[1] + 1, box[2], box[3] - 1], fill=BEST_FILL)
        elif i:
            draw.line([box[0], ry, box[2], ry], fill=RULE)
        ty = ry + (h - left_h) // 2
        for role, lines, f, x0, w, right, fill in parts:
            ty = put(role, lines, f, x0, w, ty, i, fill)
        if r.best:
            tw = text_width(draw, _safe(best_tag), tag_f)
            tx, tyy = margin, ty + 4
            draw.rounded_rectangle([tx, tyy, tx + tw + 12, tyy + tag_h], radius=4, fill=BEST_COLOR)
            put("tag", [_safe(best_tag)], tag_f, tx + 6, min(tw, label_width), tyy + 2, i, (255, 255, 255))
        iy = ry + (h - tile) // 2
        for c in range(min(cols, a.shape[0])):
            t = Image.fromarray(a[c]).resize((tile, tile), Image.NEAREST)
            canvas.paste(t, (images_x + c * (tile + pad), iy))
        for role, lines, f, x0, w, right, fill in cells:
            ch = len(lines) * line_height(f)
            put(role, lines, f, x0, w, ry + (h - ch) // 2, i, fill, bool(right))
        if r.best:
            draw.rectangle([box[0], box[1] + 1, box[2], box[3] - 1], outline=BEST_COLOR, width=3)
            grid.best_rows.append(i)
    fy = row_plans[-1][0] + row_plans[-1][1] + 6
    for role, lines, f, x0, w in foot:
        fy = put(role, lines, f, x0, w, fy, None, GREY)
    return grid


def write_png(image, path: str | os.PathLike) -> Path:
    """``image`` as a PNG at ``path``, written atomically (its folder made)."""
    out = Path(path)
    make_dirs(out.parent)
    return atomic_write(out, lambda fh: image.save(fh, format="PNG"))


def save_grid(rows: Sequence[tuple[str, Any]] | Sequence[GridRow], path: str | os.PathLike, zoom: int = 4,
              max_cols: int = 16, **kw: Any) -> Path:
    """A labelled PNG: one row per ``(label, images)`` or :class:`GridRow` (``kw``: :func:`render_grid`'s),
    written atomically."""
    grid_rows = [r if isinstance(r, GridRow) else GridRow(r[0], r[1]) for r in rows]
    return write_png(render_grid(grid_rows, zoom=zoom, max_cols=max_cols, **kw).image, path)


__all__ = ["BEST_COLOR", "Column", "DrawnText", "Grid", "GridRow", "fit", "font", "render_grid", "save_grid",
           "text_width", "wrap", "write_png"]
