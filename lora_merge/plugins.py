"""One plug-in mechanism for the registries below the floors that fill them.

Lower layers keep registries filled by name — base models (:func:`lora_merge.model_mode.base_model.
register_base_model`), reference-image sources (:func:`lora_merge.model_mode.images.register_image_source`),
priors tables (:func:`lora_merge.priors.register_priors`) and architectures (:func:`lora_merge.arch.
register_arch`).  Code that sits higher (the bundled toy world, or a third-party package) fills them from
a *plug-in module*: a module imported by :func:`load_all`, which registers at import time or defines a
``register()`` function that is then called once.

Plug-ins are the built-ins in :data:`BUILTIN_PLUGINS` plus every entry point of the group
:data:`ENTRY_POINT_GROUP` (``[project.entry-points."lora_merge.plugins"]``; the entry point may name a
module or a callable, which is called).  Each registry calls :func:`load_all` on its first lookup, so
importing the core never imports a plug-in.  A plug-in that fails to load is reported once as a warning
and listed by :func:`failed`; the others still load.  A built-in that fails raises.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from importlib.metadata import entry_points

#: plug-in modules shipped with the package (imported first, in this order)
BUILTIN_PLUGINS: tuple[str, ...] = ("lora_merge.toyworld.plugin",)
#: the entry-point group third-party plug-ins declare
ENTRY_POINT_GROUP = "lora_merge.plugins"

_lock = threading.RLock()
_loaded: list[str] = []
_failed: dict[str, str] = {}
_done = False
_loading = False


def load_all() -> None:
    """Import every plug-in once (built-ins, then entry points); later calls return at once.

    Re-entrant: a registry looked up while the plug-ins are loading (a plug-in that reads a registry
    while it registers) does not start a second load."""
    global _done, _loading
    if _done or _loading:
        return
    with _lock:
        if _done or _loading:
            return
        _loading = True
        try:
            for name in BUILTIN_PLUGINS:  # part of the package: a failure here is a bug, so it raises
                _register(importlib.import_module(name))
                _loaded.append(name)
            for ep in _entry_points():
                _load(f"{ep.name} ({ep.value})", ep.load)
        finally:
            _loading = False
            _done = True


def _entry_points():
    try:
        return list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # noqa: BLE001 - a broken distribution's metadata  # pragma: no cover
        return []


def _load(label: str, loader) -> None:
    try:
        _register(loader())
    except Exception as exc:  # noqa: BLE001 - a broken plug-in must not take the tool down
        _failed[label] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"lora-merge plug-in {label} failed to load: {exc}", RuntimeWarning, stacklevel=3)
        return
    _loaded.append(label)


def _register(obj) -> None:
    register = getattr(obj, "register", None)
    if callable(register):
        register()
    elif callable(obj) and not isinstance(obj, type(importlib)):
        obj()


def loaded() -> list[str]:
    """The plug-ins loaded so far, in load order."""
    return list(_loaded)


def failed() -> dict[str, str]:
    """Plug-ins that failed to load → the error."""
    return dict(_failed)
