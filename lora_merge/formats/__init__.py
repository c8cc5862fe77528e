"""Readers and writers for every common LoRA dialect (see docs/formats.md)."""
from __future__ import annotations

from .detect import DIALECTS, detect_dialect
from .unsupported import check_supported, find_unsupported

#: dialects :func:`lora_merge.save` can write
WRITERS = ("kohya", "diffusers", "peft")

__all__ = ["DIALECTS", "WRITERS", "check_supported", "detect_dialect", "find_unsupported"]
