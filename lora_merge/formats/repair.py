"""Known broken LoRA layouts: a hint when a file's keys match one, and the mechanical repair
(``lora_merge.load(path, repair=True)``, ``lora-merge convert IN OUT --repair``).

The one pattern handled today is a broken kohya conversion found in the wild: every module named
``lora_unet_unet_<path>_lora_down.weight`` / ``_lora_up.weight`` (the diffusers ``unet.`` prefix kept
inside the kohya name, ``_`` instead of ``.`` before ``lora_down``) and no ``.alpha`` (so alpha = rank,
scale 1, as in the diffusers file it came from).  The repair renames the keys to
``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight``; the tensors are unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

__all__ = ["BROKEN_KOHYA", "broken_pattern", "repair_keys", "unparsed_hint"]

T = TypeVar("T")

#: ``lora_unet_unet_<path>_lora_down.weight`` (also ``lora_te_text_encoder_…`` and ``.alpha`` variants)
BROKEN_KOHYA = re.compile(
    r"^lora_(?P<comp>unet|te\d?)_(?:unet|text_encoder(?:_2)?)_(?P<path>.+?)[_.](?P<part>lora_down\.weight|"
    r"lora_up\.weight|alpha)$"
)

_EXAMPLES = 2


def broken_pattern(keys: Iterable[str]) -> str | None:
    """A one-sentence description of the known broken layout most ``keys`` follow, or None."""
    keys = list(keys)
    hits = sum(1 for k in keys if BROKEN_KOHYA.match(k))
    if not hits or hits * 2 < len(keys):
        return None
    return ("these keys look like a broken kohya conversion (lora_unet_unet_…_lora_down.weight: the 'unet_' "
            "prefix doubled, '_' instead of '.' before lora_down/lora_up, no alpha); `lora-merge convert IN OUT "
            "--repair` (lora_merge.load(..., repair=True)) renames them")


def unparsed_hint(keys: Iterable[str]) -> str:
    """``"; e.g. k1, k2"`` (a couple of the keys) and the broken-layout hint when one applies."""
    keys = sorted(keys)
    if not keys:
        return ""
    text = "; e.g. " + ", ".join(keys[:_EXAMPLES]) + (", …" if len(keys) > _EXAMPLES else "")
    hint = broken_pattern(keys)
    return text + (f"; {hint}" if hint else "")


def repair_keys(refs: dict[str, T]) -> tuple[dict[str, T], int]:
    """``refs`` with the keys of a known broken layout renamed (values unchanged), and how many were."""
    out: dict[str, T] = {}
    fixed = 0
    for key, value in refs.items():
        m = BROKEN_KOHYA.match(key)
        new = f"lora_{m.group('comp')}_{m.group('path')}.{m.group('part')}" if m else key
        fixed += new != key
        out[new if new not in out else key] = value
    return out, fixed
