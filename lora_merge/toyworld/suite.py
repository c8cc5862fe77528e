"""The content–style benchmark suite: every held-out subject × every held-out style (3 × 3 = 9 pairs).

A pair is one DreamBooth content LoRA and one StyleDrop style LoRA, both trained on the frozen base
(``lora-merge toyworld train-loras``).  The prompts a pair is judged on:

* content check ``a sks object`` (the content LoRA's training caption);
* style check ``a <seen shape> in zkz style`` for every seen shape except the style's own reference shape
  (the style LoRA must transfer to objects it never saw, as StyleDrop's are judged);
* joint ``a sks object in zkz style`` (what a merge must draw).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from . import world
from .train import LORA_DIR, lora_file


@dataclass(frozen=True)
class Pair:
    subject: str
    style: str

    @property
    def name(self) -> str:
        return f"{self.subject}+{self.style}"

    @property
    def content_prompt(self) -> str:
        return world.caption(self.subject, None)

    @property
    def joint_prompt(self) -> str:
        return world.caption(self.subject, self.style)

    @property
    def content_style(self) -> str:
        """The seen style the subject's photos are drawn in (what the content LoRA leaks)."""
        return world.SUBJECTS[self.subject]

    @property
    def style_shape(self) -> str:
        """The seen shape of the style's one reference image (what the style LoRA leaks)."""
        return world.STYLE_CONCEPTS[self.style]

    def paths(self, lora_dir: Path | None = None) -> tuple[Path, Path]:
        d = Path(lora_dir) if lora_dir is not None else LORA_DIR
        return d / lora_file(self.subject), d / lora_file(self.style)


def style_check_prompts(style: str) -> list[str]:
    """``a <shape> in <style> style`` for every seen shape but the style's reference shape."""
    ref = world.STYLE_CONCEPTS[style]
    return [world.caption(s, style) for s in world.SEEN_SHAPES if s != ref]


def unbound_prompts(word: str) -> list[str]:
    """Prompts without ``word``'s trigger: a LoRA "binds" to its word when its concept stays away here.
    Subjects: every seen shape in a seen style other than the subject's photo style; styles: every seen
    shape in a seen style."""
    if word in world.SUBJECTS:
        styles = [t for t in world.SEEN_STYLES if t != world.SUBJECTS[word]]
        return [world.caption(s, t) for s in world.SEEN_SHAPES for t in styles][:8]
    return [world.caption(s, t) for s, t in zip(world.SEEN_SHAPES, world.SEEN_STYLES * 2)]


SUITE: tuple[Pair, ...] = tuple(Pair(c, s) for c in world.SUBJECTS for s in world.STYLE_CONCEPTS)
#: ``--quick``'s pairs: one per subject and one per style
QUICK: tuple[str, ...] = ("sks+zkz", "ohwx+bfk", "tqk+mrv")


def pairs(names: str | list[str] | None = None) -> list[Pair]:
    """The suite's pairs by name (``"sks+zkz,tqk+mrv"`` or a list); all when ``names`` is empty."""
    if not names:
        return list(SUITE)
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    by_name = {p.name: p for p in SUITE}
    unknown = [n for n in wanted if n and n not in by_name]
    if unknown:
        raise UsageError(f"unknown pair {unknown[0]!r}; the suite's pairs: {', '.join(by_name)}")
    return [by_name[n] for n in wanted if n]


__all__ = ["QUICK", "SUITE", "Pair", "pairs", "style_check_prompts", "unbound_prompts"]
