"""Model families as data: one :class:`ModelFamily` per base-model family, registered in one place.

Each built-in family is one module of this package that defines ``FAMILY`` (:data:`BUILTIN` names them);
:func:`get` imports a family's module on first use, by name, and :func:`all_families` imports the ones
not imported yet.  The rest of the package asks the family instead of keeping its own table: detection
(:func:`detect`, behind :func:`lora_merge.arch.guess_arch`), display names, UNet block resolutions and the
native latent size, DiT block lists, layouts and the layout each dialect writes, priors tables, pipeline
loaders and the lists of families in help texts (:func:`help_list`).

Objects that live higher up — a layout converter in :mod:`lora_merge.formats`, a pipeline loader in
:mod:`lora_merge.model_mode` — are named by ``"module:attr"`` strings and resolved at use
(:func:`resolve`), never imported here: family modules are data and detection rules (regular
expressions on module names and shapes) and sit on floor 1, below everything that reads them.

Plug-ins add families with :func:`register_family` (:func:`lora_merge.arch.register_arch` is a thin
wrapper); a name no built-in family has is looked up in the plug-ins that declare it
(:func:`lora_merge.plugins.load_for`).  Adding a built-in family is one module here, its line in
:data:`BUILTIN`, and its tests (docs/formats.md, "Adding a model family").
"""
from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .. import plugins

if TYPE_CHECKING:
    from ..adapter import Adapter

__all__ = ["BUILTIN", "ModelFamily", "all_families", "builtin", "builtin_families", "by_pipeline",
           "cross_attention_widths", "detect", "generation", "get", "help_list", "is_registered", "names",
           "register_family", "resolve"]

#: built-in family name → its module in this package; the order is the order families are listed in
#: (help texts, ``arch.ARCH_NAMES``) and layouts are tried in (:func:`lora_merge.formats.layout.layouts`)
BUILTIN: dict[str, str] = {
    "sd1": "sd1",
    "sd2": "sd2",
    "sdxl": "sdxl",
    "flux": "flux",
    "flux2": "flux2",
    "sd3": "sd3",
    "wan": "wan",
    "z-image": "zimage",
    "qwen-image": "qwen_image",
}

#: a detection rule: ``(rank, test)``; ``test(adapter) -> bool``
DetectRule = tuple[int, Callable[["Adapter"], bool]]


def names_match(pattern: re.Pattern[str], doc: str = "") -> Callable[[Any], bool]:
    """A detection rule: the adapter has a module whose name ``pattern`` matches."""

    def rule(adapter: Any) -> bool:
        return any(pattern.match(n) for n in adapter.modules)

    rule.__doc__ = doc or f"a module name matches {pattern.pattern}"
    return rule


def fused_layout_notes(native: str, split: str = "to_q / to_k / to_v", native_word: str = "native"
                       ) -> dict[str, str]:  # fmt: skip
    """``layout_notes`` of a family whose native layout fuses what diffusers splits (what ``inspect`` says of
    each layout, after its name: ``layout  native: <note>``, so a note does not repeat the layout's name):
    ``native`` describes the native names, ``split`` the diffusers projections."""
    return {"native": native, "diffusers": f"split {split}",
            "mixed": f"both {native_word} (fused) and diffusers (split) names"}


@dataclass(frozen=True)
class ModelFamily:
    """Everything the package knows about one family of base models, as data.

    ``detect`` holds ``(rank, test)`` rules: :func:`detect` asks the rules of every built-in family in
    rank order (lower first) and names the family of the first that holds.  The built-ins use 10–60 for
    names only one DiT family has, 70–80 for looser DiT rules and 90–140 for the UNet families (text
    encoder 2, cross-attention width, kohya metadata, block layout).  A plug-in family's rules are asked
    before every built-in one, in registration order."""

    name: str
    display: str
    #: the name in help lists ("SD3/3.5"); defaults to ``display``
    short: str = ""
    #: ``"unet"`` or ``"dit"`` (a transformer)
    kind: str = "unet"
    #: one line on what lora-merge supports for the family
    help: str = ""
    detect: tuple[DetectRule, ...] = ()
    # ---- UNet families
    #: block prefix (without ``unet.``) → latent resolution at the native image size
    block_resolutions: Mapping[str, int] | None = None
    #: native latent side length (the resolution rule's reference: content at most a quarter of it)
    native_latent: int | None = None
    # ---- DiT families
    #: the diffusers model class (``diffusers.<class>``)
    diffusers_class: str | None = None
    #: diffusers block list → number of blocks in the default (full-size) config
    blocks: Mapping[str, int] = field(default_factory=dict)
    #: hidden size of the default config
    hidden: int | None = None
    #: every numbered block list the family's module paths use, native and diffusers names
    block_lists: tuple[str, ...] = ()
    #: a regular expression (matched at the start) that the modules of the family's blocks match; defaults
    #: to ``transformer.<block list>.<N>.`` for every list in ``block_lists``
    block_pattern: str | None = None
    #: the name ``inspect`` gives each block list ("double", "single"; lists not named keep theirs)
    block_display: Mapping[str, str] = field(default_factory=dict)
    # ---- layouts
    #: ``"module:attr"`` of the family's :class:`lora_merge.formats.layout.Layout` (native ↔ diffusers)
    layout: str | None = None
    #: ``"module:attr"`` of its :class:`lora_merge.formats.fused.FusedLayout` when the native layout fuses
    #: modules (q, k and v in one ``qkv``)
    fused_layout: str | None = None
    #: how ``inspect`` describes each layout (``"native"``, ``"diffusers"``, ``"mixed"``)
    layout_notes: Mapping[str, str] = field(default_factory=dict)
    #: dialects that write this family in another layout than the dialect's own
    #: (:data:`lora_merge.formats.layout.DIALECT_LAYOUT`)
    dialect_layout: Mapping[str, str] = field(default_factory=dict)
    # ---- priors
    #: published priors tables for the family: table name → ``"module:attr"`` of a factory
    priors: Mapping[str, str] = field(default_factory=dict)
    #: the table ``--priors auto`` picks; defaults to the resolution rule on ``block_resolutions``
    #: (the family's own name) when it has them, else none
    auto_priors: str | None = None
    # ---- model mode
    #: diffusers pipeline classes (``model_index.json`` ``_class_name``) of the family that load as base models
    pipelines: tuple[str, ...] = ()
    #: ``"module:attr"`` of the loader of those pipelines when they are not UNet pipelines
    pipeline_loader: str | None = None

    def __post_init__(self):
        set_ = object.__setattr__.__get__(self)
        set_("short", self.short or self.display)
        if self.block_resolutions is not None:
            set_("block_resolutions", MappingProxyType(dict(self.block_resolutions)))
        for name in ("blocks", "block_display", "layout_notes", "dialect_layout", "priors"):
            set_(name, MappingProxyType(dict(getattr(self, name))))
        set_("detect", tuple(self.detect))
        if self.auto_priors is None and self.block_resolutions is not None and self.native_latent is not None:
            set_("auto_priors", self.name)
        if self.block_pattern is None and self.block_lists:
            set_("block_pattern", rf"transformer\.({'|'.join(map(re.escape, self.block_lists))})\.\d+\.")

    def claims(self, adapter: Adapter) -> bool:
        """Whether one of the family's own detection rules holds for ``adapter``."""
        return any(test(adapter) for _, test in self.detect)

    def has_block_module(self, name: str) -> bool:
        """Whether ``name`` is a module of the family's (DiT) blocks."""
        return self.block_pattern is not None and re.match(self.block_pattern, name) is not None


_lock = threading.RLock()
_builtin: dict[str, ModelFamily] = {}
_registered: dict[str, ModelFamily] = {}
_rules: list[tuple[int, int, str, Callable]] | None = None
_generation = 0


def builtin(name: str) -> ModelFamily | None:
    """The built-in family ``name`` (its module imported on first use), or None."""
    fam = _builtin.get(name)
    if fam is None and name in BUILTIN:
        with _lock:
            fam = _builtin.get(name)
            if fam is None:
                fam = importlib.import_module(f"{__name__}.{BUILTIN[name]}").FAMILY
                if fam.name != name:  # pragma: no cover - a mistake in BUILTIN
                    raise RuntimeError(f"{__name__}.{BUILTIN[name]} defines family {fam.name!r}, not {name!r}")
                _builtin[name] = fam
    return fam


def builtin_families() -> tuple[ModelFamily, ...]:
    """The built-in families, in :data:`BUILTIN` order (each module imported once)."""
    return tuple(builtin(n) for n in BUILTIN)  # type: ignore[misc]


def get(name: str | None, *, load_plugins: bool = True) -> ModelFamily | None:
    """The family ``name``: a plug-in's (a registered family shadows a built-in of the same name), a
    built-in one, or — when neither has it and ``load_plugins`` — one a plug-in that declares the name
    registers (:func:`lora_merge.plugins.load_for`); None when nobody knows it."""
    if name is None:
        return None
    fam = _registered.get(name) or builtin(name)
    if fam is None and load_plugins and plugins.load_for("arch", name):
        fam = _registered.get(name)
    return fam


def all_families(*, load_plugins: bool = False) -> tuple[ModelFamily, ...]:
    """The built-in families (in :data:`BUILTIN` order, shadowed by registered ones of the same name), then
    the other registered ones; with ``load_plugins`` every plug-in is loaded first."""
    if load_plugins:
        plugins.load_all()
    out = [_registered.get(f.name, f) for f in builtin_families()]
    out += [f for n, f in list(_registered.items()) if n not in BUILTIN]
    return tuple(out)


def names(*, load_plugins: bool = False) -> list[str]:
    return [f.name for f in all_families(load_plugins=load_plugins)]


def register_family(family: ModelFamily) -> ModelFamily:
    """Add (or replace) a family; its ``detect`` rules are asked before the built-in families'."""
    global _generation
    with _lock:
        _registered.pop(family.name, None)
        _registered[family.name] = family
        _generation += 1
    return family


def is_registered(name: str) -> bool:
    """Whether ``name`` was registered (by a plug-in) rather than built in."""
    return name in _registered


def generation() -> int:
    """A number that changes whenever a family is registered (for caches of facts over all families)."""
    return _generation


def _builtin_rules() -> list[tuple[int, int, str, Callable]]:
    global _rules
    if _rules is None:
        with _lock:
            rules = [(rank, i, fam.name, test) for i, fam in enumerate(builtin_families())
                     for rank, test in fam.detect]
            _rules = sorted(rules, key=lambda r: (r[0], r[1]))
    return _rules


def _registered_claim(adapter: Adapter) -> str | None:
    for fam in list(_registered.values()):
        if fam.claims(adapter):
            return fam.name
    return None


def detect(adapter: Adapter) -> str | None:
    """The family whose detection rule holds first: the plug-ins' families (the plug-ins that claim the
    adapter loaded first, :func:`lora_merge.plugins.load_for_adapter`), then the built-in rules in rank
    order; when none holds, the plug-ins that may detect anything without saying so beforehand are loaded
    and asked.  None when nothing fits."""
    plugins.load_for_adapter(adapter.metadata)
    hit = _registered_claim(adapter)
    if hit is not None:
        return hit
    for _, _, name, test in _builtin_rules():
        if test(adapter):
            return name
    if plugins.load_for_adapter(adapter.metadata, fallback=True):
        return _registered_claim(adapter)
    return None


def by_pipeline(class_name: str) -> ModelFamily | None:
    """The family whose pipelines include ``class_name`` (``model_index.json`` ``_class_name``)."""
    return next((f for f in all_families() if class_name in f.pipelines), None)


#: ``"package.module:attr"`` → the object (:func:`lora_merge.plugins.resolve`)
resolve = plugins.resolve


def help_list(pick: Callable[[ModelFamily], bool] = lambda f: True, *, key: str = "short",
              families: Iterable[ModelFamily] | None = None, last: str = ", ") -> str:
    """``"SD 1.x, SDXL, FLUX.1"``: the ``key`` (``short`` or ``name``) of the built-in families ``pick``
    accepts, in :data:`BUILTIN` order, joined by ``", "`` (``last`` before the last one)."""
    items = [getattr(f, key) for f in (families if families is not None else builtin_families()) if pick(f)]
    if len(items) < 2:
        return "".join(items)
    return ", ".join(items[:-1]) + last + items[-1]


# ---------------------------------------------------------------- helpers shared by the UNet families
def cross_attention_widths(adapter: Adapter) -> set[int]:
    """The input widths of the UNet's cross-attention ``to_k`` / ``to_v`` (the text encoder's width:
    768 CLIP ViT-L, 1024 OpenCLIP ViT-H, 2048 SDXL's two encoders side by side)."""
    return {m.in_features for n, m in adapter.modules.items() if n.endswith(("attn2.to_k", "attn2.to_v"))}
