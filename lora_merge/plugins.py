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

The class registries above (strategies, ``lora_merge.strategies``; sampling-time mergers,
``lora_merge.sampling_time``) load their own entry-point groups through :func:`load_entry_points`, so a
broken plug-in fails the same way in every group: one ``RuntimeWarning`` ``lora-merge <kind> plug-in NAME
(module:attr) failed to load: ERROR``, an entry in :func:`failed`, and the other plug-ins still load.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

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
            load_entry_points(ENTRY_POINT_GROUP, "", lambda name, obj: _register(obj))
        finally:
            _loading = False
            _done = True


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
