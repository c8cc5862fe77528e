"""Reference images for model mode: image folders and registered image sources."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import plugins
from ..errors import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


#: ``source(n, seed) -> (images, captions or None)``: ``N × 3 × H × W`` images in ``[-1, 1]``; ``n`` None
#: asks for the source's default set
ImageSource = Callable[[int | None, int], tuple[torch.Tensor, list[str] | None]]

#: named image sources (``"toyworld:content"``); plug-ins fill it, see :mod:`lora_merge.plugins`
_SOURCES: dict[str, ImageSource] = {}


def register_image_source(name: str, source: ImageSource) -> None:
    """Make ``name`` usable wherever reference images are expected (``--content-images NAME``).
    ``source(n, seed)`` returns ``(images, captions)`` (captions may be None; they are the default prompts
    of measured priors).  Names read ``plugin:concept``; a registered name takes precedence over a folder."""
    _SOURCES[name] = source


def image_source_names() -> list[str]:
    """The registered image-source names (plug-ins loaded)."""
    plugins.load_all()
    return sorted(_SOURCES)


def is_image_source(spec: object) -> bool:
    """Whether ``spec`` names a registered image source (plug-ins loaded)."""
    if isinstance(spec, torch.Tensor) or spec is None:
        return False
    plugins.load_all()
    return os.fspath(spec) in _SOURCES


def load_image_source(
    name: str, size: int, n: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, list[str] | None]:
    """``(images resized to size × size, captions or None)`` from a registered source."""
    plugins.load_all()
    if name not in _SOURCES:
        _unknown_source(name)
        raise UsageError(f"no image source {name!r}; registered: {', '.join(sorted(_SOURCES)) or 'none'}")
    imgs, captions = _SOURCES[name](n, seed)
    if imgs.shape[-1] != size or imgs.shape[-2] != size:
        imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
    return imgs, (None if captions is None else list(captions))


def _unknown_source(text: str) -> None:
    """A ``plugin:name`` that looks like a registered source but is not one is a usage error."""
    scheme, sep, _ = text.partition(":")
    same = sorted(n for n in _SOURCES if sep and n.startswith(scheme + ":"))
    if same and not Path(text).is_dir():
        raise UsageError(f"{text!r}: use {' or '.join(same)}")


def resolve_images(spec: torch.Tensor | str | os.PathLike, size: int) -> torch.Tensor:
    """Reference images from a tensor, a registered source (the bundled toy world registers
    ``toyworld:content`` / ``toyworld:style``, the images its LoRAs were trained on) or a folder."""
    if isinstance(spec, torch.Tensor):
        return spec
    text = os.fspath(spec)
    if is_image_source(text):
        return load_image_source(text, size)[0]
    _unknown_source(text)
    return load_image_folder(text, size)


def load_image_folder(directory: str | os.PathLike, size: int) -> torch.Tensor:
    """All images in ``directory`` (sorted by name), RGB, shorter side resized to ``size`` and centre
    cropped, as ``N × 3 × size × size`` in ``[-1, 1]``."""
    from PIL import Image

    d = Path(directory)
    if not d.is_dir():
        raise UsageError("image folder does not exist", d)
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder", d)
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                k = size / min(w, h)
                im = im.resize((max(size, round(w * k)), max(size, round(h * k))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
        except OSError as exc:
            raise UsageError(f"cannot read image: {exc}", f) from None
        out.append(t.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)
