"""Transitional alias of :mod:`lora_merge.analysis.fidelity` (the module moved there).

Kept only until ``lora_merge/engine/layers.py`` imports ``retention`` from ``..analysis.fidelity``;
then delete this file."""
from __future__ import annotations

from .analysis.fidelity import evaluate, retention

__all__ = ["evaluate", "retention"]
