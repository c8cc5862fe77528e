"""Architecture facts of DiT families (FLUX.1, FLUX.2, SD3/3.5, Wan 2.x, Z-Image, Qwen-Image), as views of
their :class:`~lora_merge.families.ModelFamily` objects, and what ``inspect`` shows of a DiT LoRA.

The facts themselves — block counts and hidden sizes of the diffusers model classes' default configs,
detection, layouts — are data in :mod:`lora_merge.families`; ``tests/test_dit_families.py`` and the
per-family tests build each class on the meta device (no weights, :func:`meta_model`) and check the
numbers and every module name the dialects use.  :func:`family_summary` is what ``inspect`` shows for a
DiT LoRA: family, blocks touched, layout.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .. import arch, families
from ..adapter import Adapter
from ..families import ModelFamily
from .layout import layout_of

__all__ = ["FAMILIES", "FUSED_LAYOUTS", "DitFacts", "family_summary", "meta_model"]

#: the facts of a DiT family (``name``, ``display``, ``diffusers_class``, ``blocks``, ``hidden`` …)
DitFacts = ModelFamily


class _DitFamilies(Mapping[str, ModelFamily]):
    """family name → :class:`~lora_merge.families.ModelFamily`, for the transformer (DiT) families."""

    def __getitem__(self, name: str) -> ModelFamily:
        fam = families.get(name) if isinstance(name, str) else None
        if fam is None or fam.kind != "dit":
            raise KeyError(name)
        return fam

    def __iter__(self) -> Iterator[str]:
        return iter([f.name for f in families.all_families() if f.kind == "dit"])

    def __len__(self) -> int:
        return len(list(iter(self)))


class _FusedLayouts(Mapping[str, Any]):
    """family → its :class:`~lora_merge.formats.fused.FusedLayout` (the families whose native layout fuses
    modules; block twins for measured priors: ``transformer_blocks.3`` ↔ ``double_blocks.3``)."""

    def __getitem__(self, name: str) -> Any:
        fam = FAMILIES.get(name)
        if fam is None or fam.fused_layout is None:
            raise KeyError(name)
        return families.resolve(fam.fused_layout)

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, f in FAMILIES.items() if f.fused_layout is not None])

    def __len__(self) -> int:
        return len(list(iter(self)))


FAMILIES: Mapping[str, ModelFamily] = _DitFamilies()
FUSED_LAYOUTS: Mapping[str, Any] = _FusedLayouts()


def meta_model(family: str, **config):
    """The family's diffusers model built on the meta device from its default config (``config``
    overrides fields); no weights are read or allocated.  Needs diffusers and accelerate."""
    import accelerate
    import diffusers

    cls = getattr(diffusers, FAMILIES[family].diffusers_class)
    with accelerate.init_empty_weights():
        return cls(**config)


def family_summary(adapter: Adapter, family: str | None = None) -> dict | None:
    """``{"family", "blocks": {"double": n, …}, "layout", "layout_note"}`` for a DiT LoRA, else None."""
    family = family or arch.guess_arch(adapter)
    fam = FAMILIES.get(family)
    if fam is None:
        return None
    touched: dict[str, set[int]] = {}
    for n in adapter.modules:
        m = arch.DIT_BLOCK_RE.match(n)
        if m:
            touched.setdefault(fam.block_display.get(m.group(2), m.group(2)), set()).add(int(m.group(3)))
    lay = layout_of(adapter)
    out = {"family": fam.name, "family_name": fam.display,
           "blocks": {k: len(v) for k, v in sorted(touched.items())},
           "blocks_in_model": dict(fam.blocks)}
    if fam.fused_layout is not None:  # the native layout fuses q, k and v: inspect says "fused" / "split"
        kind = lay[1] if lay and lay[0] == family else "diffusers"
        out["layout"] = kind
        out["attention"] = {"native": "fused", "diffusers": "split", "mixed": "mixed"}[kind]
        out["layout_note"] = fam.layout_notes[kind]
    elif lay is not None and lay[0] == family:
        out["layout"] = lay[1]
        out["attention"] = "split"
        out["layout_note"] = fam.layout_notes.get(lay[1], lay[1])
    return out
