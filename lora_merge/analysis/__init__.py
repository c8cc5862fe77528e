"""Read-only reports on adapters: :mod:`.inspection` (one adapter's summary, ``lora-merge inspect``),
:mod:`.diff` (two adapters module by module, ``lora-merge diff``) and :mod:`.fidelity` (how much of
each source LoRA a merge keeps)."""
from __future__ import annotations

from .diff import diff_adapters, exceeds, extra_tensors_differ
from .fidelity import evaluate, retention
from .inspection import summarize

__all__ = ["diff_adapters", "evaluate", "exceeds", "extra_tensors_differ", "retention", "summarize"]
