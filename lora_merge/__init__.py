"""lora-merge: merge LoRA adapters across kohya, diffusers and PEFT dialects."""
from __future__ import annotations

from .adapter import Adapter, LoraModule, TensorRef
from .errors import FormatError, LoraMergeError, MergeError, UnsupportedAdapterError, UsageError

__version__ = "0.1.0"

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
]
