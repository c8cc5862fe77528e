"""lora-merge: merge LoRA adapters across kohya, diffusers and PEFT dialects."""
from __future__ import annotations

from .adapter import Adapter, LoraModule, TensorRef
from .errors import FormatError, LoraMergeError, MergeError, UnsupportedAdapterError, UsageError
from .formats.api import convert, load, save

from ._version import __version__

from .engine import MergeResult, merge

__all__ = [
    "Adapter",
    "FormatError",
    "LoraMergeError",
    "LoraModule",
    "MergeError",
    "MergeResult",
    "TensorRef",
    "UnsupportedAdapterError",
    "UsageError",
    "__version__",
    "convert",
    "load",
    "merge",
    "save",
]
