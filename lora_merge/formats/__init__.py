"""Readers and writers for every common LoRA dialect (see docs/formats.md).

Each dialect is one :class:`Dialect` object in the registry (:mod:`lora_merge.formats.registry`); the
built-ins are registered here, in the order that breaks detection ties: kohya, diffusers, PEFT, ComfyUI,
LyCORIS, XLabs.  ``dit_arch``, ``flux``, ``flux2``, ``layout``, ``sd3``, ``wan`` and ``zimage`` are imported for what they register (the
DiT architecture facts and the layout conversions).
:mod:`lora_merge.formats.api` (``load``/``save``/``convert``) loops over the registry.
"""
from __future__ import annotations

from . import comfyui, diffusers, dit_arch, flux, flux2, kohya, layout, lycoris, peft, sd3, wan, xlabs, zimage  # noqa: F401  (registrations)
from .registry import (
    Dialect,
    Located,
    Written,
    detect_dialect,
    dialects,
    get_dialect,
    register_dialect,
    registered,
)
from .unsupported import check_supported, find_unsupported

for _dialect in (kohya.DIALECT, diffusers.DIALECT, peft.DIALECT, comfyui.DIALECT, lycoris.DIALECT, xlabs.DIALECT):
    register_dialect(_dialect)
del _dialect

__all__ = [
    "Dialect",
    "Located",
    "Written",
    "check_supported",
    "detect_dialect",
    "dialects",
    "find_unsupported",
    "get_dialect",
    "register_dialect",
    "registered",
]
