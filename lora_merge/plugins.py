"""One plug-in mechanism for the registries below the floors that fill them.

Lower layers keep registries filled by name — base models (:func:`lora_merge.model_mode.base_model.
register_base_model`), reference-image sources (:func:`lora_merge.model_mode.images.register_image_source`),
priors tables (:func:`lora_merge.priors.register_priors`) and architectures (:func:`lora_merge.arch.
register_arch`).  Code that sits higher (the bundled toy world, or a third-party package) fills them from
a *plug-in module*: a module imported on a lookup that needs it, which registers at import time or defines a
``register()`` function that is then called once.

Plug-ins are the built-ins in :data:`BUILTIN_PLUGINS` plus every entry point of the group
:data:`ENTRY_POINT_GROUP` (``[project.entry-points."lora_merge.plugins"]``; the entry point may name a
module or a callable, which is called).  A built-in declares what it fills (:class:`BuiltinPlugin`): a
registry asked for a name it does not hold loads the plug-ins that declare that name (:func:`load_for`),
the architecture detector loads the ones whose claims an adapter's metadata meets
(:func:`load_for_adapter`), and only a lookup that lists a registry's names loads them all
(:func:`load_all`).  So importing the core, or merging two SD LoRAs, never imports the toy world.  A
plug-in that fails to load is reported once as a warning and listed by :func:`failed`; the others still
load.  A built-in that fails raises.

The class registries above (strategies, ``lora_merge.strategies``; sampling-time mergers,
``lora_merge.sampling_time``) load their own entry-point groups through :func:`load_entry_points`, so a
broken plug-in fails the same way in every group: one ``RuntimeWarning`` ``lora-merge <kind> plug-in NAME
(module:attr) failed to load: ERROR``, an entry in :func:`failed`, and the other plug-ins still load.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class BuiltinPlugin:
    """A plug-in module shipped with the package and what it fills, declared here so that a lookup
    imports it only when it may answer (the toy world's plug-in imports some 46 modules)."""

    module: str
    #: registry (``"arch"``, ``"base_model"``, ``"image_source"``, ``"priors"``) → the names the plug-in
    #: registers there; a name ending in ``*`` stands for every name with that prefix
    provides: Mapping[str, tuple[str, ...]]
    #: adapter metadata key → a text whose presence in that value says the adapter is of one of the
    #: plug-in's architectures: the plug-in is loaded before the built-in families are asked.  A plug-in
    #: that provides ``"arch"`` without claims is loaded for detection only when no family matched.
    claims: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.module

    def fills(self, registry: str, name: str) -> bool:
        return any(name.startswith(n[:-1]) if n.endswith("*") else name == n for n in self.provides.get(registry, ()))

    def claims_metadata(self, metadata: Mapping[str, Any] | None) -> bool:
        md = metadata or {}
        return any(text in str(md.get(key, "")) for key, text in self.claims.items())


#: plug-in modules shipped with the package, each loaded by the first lookup it can answer
BUILTIN_PLUGINS: tuple[BuiltinPlugin, ...] = (
    BuiltinPlugin(
        "lora_merge.toyworld.plugin",
        provides={"arch": ("toyworld",), "base_model": ("toyworld",), "image_source": ("toyworld:*",),
                  "priors": ("toyworld",)},
        claims={"modelspec.architecture": "toyworld"},
    ),
)
#: the entry-point group third-party plug-ins declare
ENTRY_POINT_GROUP = "lora_merge.plugins"

_lock = threading.RLock()
_loaded: list[str] = []
_failed: dict[str, str] = {}
_started: set[str] = set()  # built-ins imported or being imported
_external_done = False
_external_loading = False


def load_all() -> None:
    """Import every plug-in once (built-ins, then entry points); later calls return at once.  For the
    lookups that list a registry's names.

    Re-entrant: a registry looked up while the plug-ins are loading (a plug-in that reads a registry
    while it registers) does not start a second load."""
    for plugin in BUILTIN_PLUGINS:
        _load_builtin(plugin)
    load_external()


def load_external() -> None:
    """Load every entry point of :data:`ENTRY_POINT_GROUP` once.  Third-party plug-ins cannot say beforehand
    what they fill, so any lookup that may need a plug-in loads them (nothing when none is installed)."""
    global _external_done, _external_loading
    if _external_done or _external_loading:
        return
    with _lock:
        if _external_done or _external_loading:
            return
        _external_loading = True
        try:
            load_entry_points(ENTRY_POINT_GROUP, "", lambda name, obj: _register(obj))
        finally:
            _external_loading = False
            _external_done = True


def _load_builtin(plugin: BuiltinPlugin) -> bool:
    if plugin.module in _started:
        return False
    with _lock:
        if plugin.module in _started:
            return False
        _started.add(plugin.module)
        _register(importlib.import_module(plugin.module))  # part of the package: a failure is a bug, so it raises
        _loaded.append(plugin.module)
    return True


def load_for(registry: str, name: str) -> bool:
    """Load the plug-ins that may register ``name`` in ``registry`` and are not loaded yet: the entry
    points, and the built-ins that declare it (:attr:`BuiltinPlugin.provides`).  True when a plug-in was
    loaded by this call (the lookup is worth repeating)."""
    before = len(_loaded)
    load_external()
    for plugin in BUILTIN_PLUGINS:
        if plugin.fills(registry, name):
            _load_builtin(plugin)
    return len(_loaded) > before


def load_for_adapter(metadata: Mapping[str, Any] | None, *, fallback: bool = False) -> bool:
    """Load the plug-ins that may detect an adapter's architecture: the entry points, and the built-ins
    whose :attr:`BuiltinPlugin.claims` its ``metadata`` meets; with ``fallback`` (no family matched) also
    the built-ins that provide architectures without declaring claims.  True when a plug-in was loaded by
    this call."""
    before = len(_loaded)
    load_external()
    for plugin in BUILTIN_PLUGINS:
        if plugin.claims_metadata(metadata) or (fallback and "arch" in plugin.provides and not plugin.claims):
            _load_builtin(plugin)
    return len(_loaded) > before


def load_entry_points(group: str, kind: str, add: Callable[[str, Any], None]) -> None:
    """Load every entry point of ``group`` and hand each loaded object to ``add(entry point name, object)``.

    An entry point that fails to import, or whose object ``add`` rejects by raising (not the class the
    registry wants, no name, ...), is reported once as a ``RuntimeWarning`` ``lora-merge <kind> plug-in
    NAME (VALUE) failed to load: ERROR`` and listed by :func:`failed` (as ``GROUP: NAME (VALUE)``); the
    others still load.  The one loader of every entry-point group (``lora_merge.plugins`` here,
    ``lora_merge.strategies`` and ``lora_merge.sampling_time`` in their registries)."""
    for ep in _entry_points(group):
        _load(f"{ep.name} ({ep.value})", lambda ep=ep: add(ep.name, ep.load()), kind, group)


def _entry_points(group: str) -> list:
    try:
        return list(entry_points(group=group))
    except Exception:  # noqa: BLE001 - a broken distribution's metadata  # pragma: no cover
        return []


def _load(label: str, loader: Callable[[], object], kind: str, group: str) -> None:
    try:
        loader()
    except Exception as exc:  # noqa: BLE001 - a broken plug-in must not take the tool down
        _failed[f"{group}: {label}"] = f"{type(exc).__name__}: {exc}"
        what = f"{kind} plug-in" if kind else "plug-in"
        warnings.warn(f"lora-merge {what} {label} failed to load: {exc}", RuntimeWarning, stacklevel=4)
        return
    _loaded.append(f"{group}: {label}")


def _register(obj) -> None:
    register = getattr(obj, "register", None)
    if callable(register):
        register()
    elif callable(obj) and not isinstance(obj, type(importlib)):
        obj()


def loaded() -> list[str]:
    """The plug-ins loaded so far, in load order (every entry-point group)."""
    return list(_loaded)


def failed() -> dict[str, str]:
    """Plug-ins that failed to load (every entry-point group) → the error."""
    return dict(_failed)


class ClassRegistry:
    """Declared classes by name (strategies, sampling-time mergers): the built-in modules, which register
    their classes on import, are imported on the first lookup, then the entry-point group is loaded with
    :func:`load_entry_points` (a built-in of the same name wins).  ``classes`` holds them."""

    def __init__(self, base: type, kind: str, group: str, builtin_modules: tuple[str, ...]):
        self.base, self.kind, self.group, self.builtin_modules = base, kind, group, builtin_modules
        self.classes: dict[str, type] = {}
        self._loaded = False

    def _check(self, cls: object) -> type:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a {self.base.__name__} subclass")
        if not getattr(cls, "name", None):
            raise TypeError(f"{cls.__qualname__} has no name")
        return cls

    def register(self, cls: type) -> type:
        """Class decorator: add ``cls`` under ``cls.name``."""
        self.classes[self._check(cls).name] = cls
        return cls

    def _add_plugin(self, entry: str, obj: object) -> None:
        self.classes.setdefault(self._check(obj).name, obj)  # type: ignore[union-attr]

    def load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in self.builtin_modules:
            importlib.import_module(mod)
        load_entry_points(self.group, self.kind, self._add_plugin)

    def get(self, name: str) -> type:
        self.load()
        try:
            return self.classes[name]
        except KeyError:
            raise UsageError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self.classes))}") from None


def resolve(ref: str) -> Any:
    """The object a ``"package.module:attr"`` string names, imported at this call: the form of every seam
    resolved by name in this package (CLI commands, mask solvers, a family's layouts and loaders)."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj

