"""lora-merge: merge LoRA adapters across kohya, diffusers and PEFT dialects.

The public API is re-exported here lazily (PEP 562): ``import lora_merge`` costs a few milliseconds and
imports neither torch nor any sub-package until a name is used, so the ``lora-merge`` command installs its
signal handlers before the heavy imports (Ctrl-C during start-up is then one line, not a traceback) and
``lora-merge --help`` stays fast.  ``from lora_merge import merge`` and ``lora_merge.load(...)`` work as
before; so does ``lora_merge.formats`` and every other sub-package by attribute.
"""
from __future__ import annotations

import importlib

from ._version import __version__
from .errors import (
    FormatError,
    Interrupted,
    LoraMergeError,
    MergeError,
    MissingModuleWarning,
    NotMainProcess,
    OutputExistsError,
    PartialReadWarning,
    UnsupportedAdapterError,
    UsageError,
)

#: public name -> the module that defines it
_EXPORTS = {
    "Adapter": "adapter",
    "LoraModule": "adapter",
    "TensorRef": "adapter",
    "convert": "formats.api",
    "load": "formats.api",
    "save": "formats.api",
    "MergeResult": "engine",
    "merge": "engine",
    "DenseRefactorWarning": "engine.run",
    "LoaderWarning": "formats.clients",
}

__all__ = [
    "Adapter",
    "DenseRefactorWarning",
    "FormatError",
    "Interrupted",
    "LoaderWarning",
    "LoraMergeError",
    "LoraModule",
    "MergeError",
    "MergeResult",
    "MissingModuleWarning",
    "NotMainProcess",
    "OutputExistsError",
    "PartialReadWarning",
    "TensorRef",
    "UnsupportedAdapterError",
    "UsageError",
    "__version__",
    "convert",
    "load",
    "merge",
    "save",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:  # a sub-package by attribute (lora_merge.formats …), as when this module imported them
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
