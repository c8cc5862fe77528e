"""lora-merge: merge LoRA adapters across kohya, diffusers and PEFT dialects."""
from __future__ import annotations

from .adapter import Adapter, LoraModule, TensorRef
from .errors import FormatError, LoraMergeError, MergeError, UnsupportedAdapterError, UsageError
from .api import convert, load, save

__version__ = "0.1.0"

from .engine import MergeResult, merge  # noqa: E402

__all__ = [
    "Adapter",
    "LoraModule",
    "TensorRef",
    "LoraMergeError",
    "FormatError",
    "UnsupportedAdapterError",
    "MergeError",
    "UsageError",
    "__version__",
    "load",
    "save",
    "convert",
    "merge",
    "MergeResult",
]
