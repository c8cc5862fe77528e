"""Module layouts of DiT families, and aligning adapters to the layout a dialect writes.

A transformer family can be named two ways: in its **native** layout (the original model's module
names, e.g. Flux's ``double_blocks.N.img_attn.qkv`` with fused q/k/v, or Wan's ``blocks.N.self_attn.q``)
or in the **diffusers** layout (``transformer_blocks.N.attn.to_q`` …).  kohya/musubi and ComfyUI files
use the native one, diffusers and PEFT files the diffusers one.  A family names its :class:`Layout`
(two exact converters) in its :class:`~lora_merge.families.ModelFamily` (``layout="module:attr"``, resolved
here on first use; a plug-in may also call :func:`register_layout`); :func:`align` rewrites an adapter to
the layout a dialect writes (:data:`DIALECT_LAYOUT`, or the family's ``dialect_layout``), and the merge
engine aligns every input the same way before the strategy sees a layer.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .. import arch, families
from ..adapter import Adapter, TensorRef
from ..errors import UsageError

__all__ = ["DIALECT_LAYOUT", "DerivedRef", "Layout", "align", "align_inputs", "family_of", "layout_of", "layouts",
           "register_layout"]


class DerivedRef(TensorRef):
    """A tensor computed on demand from other refs (a slice, a stack, a block placement): lazy like a
    :class:`TensorRef` in a file, and tied to that file (``handle``) so outputs never overwrite it."""

    def __init__(self, shape, dtype, fn: Callable[[], object], source: TensorRef | None = None):
        super().__init__(shape=tuple(int(s) for s in shape), dtype=dtype, key=None,
                         handle=source.handle if source is not None else None)
        self._fn = fn

    def load(self, dtype=None, device=None, *, check: bool = True):
        t = self._fn()  # derived from checked TensorRefs: ``check`` has nothing left to do
        if dtype is not None or device is not None:
            t = t.to(dtype=dtype or t.dtype, device=device or t.device)
        return t


@dataclass(frozen=True)
class Layout:
    """One family's two namings: ``detect(adapter)`` says whether an adapter belongs to the family and in
    which layout (``"native"``, ``"diffusers"``, ``"mixed"`` or None), ``to_native`` / ``to_diffusers``
    rewrite it exactly (ΔW of every weight unchanged)."""

    family: str
    detect: Callable[[Adapter], str | None]
    to_native: Callable[[Adapter], Adapter]
    to_diffusers: Callable[[Adapter], Adapter]
    #: how ``inspect`` describes each layout ("fused qkv / linear1", …): the family's ``layout_notes``
    describe: Mapping[str, str]
    #: dialects that write this family in another layout than :data:`DIALECT_LAYOUT` says (musubi-tuner
    #: writes Z-Image's kohya files with diffusers module names): the family's ``dialect_layout``
    dialect_layout: Mapping[str, str] | None = None

    def layout_for(self, dialect: str | None) -> str | None:
        return (self.dialect_layout or {}).get(dialect or "") or DIALECT_LAYOUT.get(dialect or "")


#: layouts registered by plug-ins (:func:`register_layout`); the built-in families' come from the registry
_LAYOUTS: dict[str, Layout] = {}
_RESOLVED: dict[str, Layout] = {}

#: the layout each dialect writes DiT families in (dialects not listed keep the adapter's own layout)
DIALECT_LAYOUT: dict[str, str] = {"kohya": "native", "comfyui": "native", "diffusers": "diffusers",
                                  "peft": "diffusers"}


def register_layout(layout: Layout) -> Layout:
    """Add a layout that no family names (a plug-in's); it replaces the family's own of the same name."""
    _LAYOUTS[layout.family] = layout
    return layout


def _by_family() -> dict[str, Layout]:
    """family → its layout: every family that names one (in the registry's order), then the registered."""
    out: dict[str, Layout] = {}
    for fam in families.all_families():
        if fam.layout is not None:
            lay = _RESOLVED.get(fam.layout)
            if lay is None:
                lay = _RESOLVED.setdefault(fam.layout, families.resolve(fam.layout))
            out[fam.name] = lay
    out.update(_LAYOUTS)
    return out


def layouts() -> tuple[Layout, ...]:
    return tuple(_by_family().values())


def family_of(adapter: Adapter) -> tuple[Layout, str] | None:
    """``(Layout, "native"|"diffusers"|"mixed")`` of the adapter's family: the one ``arch.guess_arch``
    names first (Flux and SD3 share some names: ``final_layer``, the double-block ``attn.to_q``), then the
    first family that recognises the adapter."""
    guess = arch.guess_arch(adapter)
    for lay in sorted(layouts(), key=lambda lay: lay.family != guess):
        got = lay.detect(adapter)
        if got is not None:
            return lay, got
    return None


def layout_of(adapter: Adapter) -> tuple[str, str] | None:
    """``(family, layout)`` or None when no registered family recognises the adapter."""
    hit = family_of(adapter)
    return None if hit is None else (hit[0].family, hit[1])


def align(adapter: Adapter, dialect: str | None, *, layout: str | None = None,
          family: str | None = None) -> Adapter:
    """The adapter in the layout ``dialect`` writes (or ``layout`` when given); the adapter itself when it
    is already there, belongs to no registered family, or the dialect has no preference.  ``family``
    (``--arch flux``) forces the family instead of detecting it."""
    by_family = _by_family() if family is not None else {}
    if family in by_family:
        lay, have = by_family[family], None
    else:
        hit = family_of(adapter)
        if hit is None:
            return adapter
        lay, have = hit
    want = layout or lay.layout_for(dialect)
    if want is None or have == want:
        return adapter
    return lay.to_native(adapter) if want == "native" else lay.to_diffusers(adapter)


def align_inputs(adapters: list[Adapter], dialect: str | None, family: str | None = None,
                 rank: int | None = None) -> list[Adapter]:
    """Every merge input in the layout of the output dialect, so a kohya Flux LoRA (fused qkv) and a
    diffusers one (split q/k/v) line up module by module (exactly: see :mod:`lora_merge.formats.flux`).
    An input with LyCORIS modules (exact dense ΔW, full rank) needs ``rank`` (``--rank``)."""
    for ad in adapters:
        if rank is None and any(getattr(m, "lycoris_type", None) for m in ad):
            kinds = sorted({m.lycoris_type for m in ad if getattr(m, "lycoris_type", None)})  # type: ignore
            raise UsageError(f"{ad.display_name}: holds {'/'.join(kinds)} modules, whose ΔW is not a low-rank "
                             "B·A; give --rank K to merge it (each merged layer is re-factored to rank K)")
    if family is None and len({hit[0] for ad in adapters if (hit := layout_of(ad))}) > 1:
        # one merge is one model: when the inputs alone point to different families (a double-block-only
        # LoRA of a small Flux looks like SD3), the family is guessed from all their modules together
        union = Adapter(modules={n: m for ad in adapters for n, m in ad.modules.items()})
        hit = family_of(union)
        family = hit[0].family if hit else None
    return [align(ad, dialect, family=family) for ad in adapters]
