"""``timestep-split``, the sampling-time merger: :mod:`lora_merge.sampling_time.timestep_split` (this path
re-exports it)."""
from __future__ import annotations

from .sampling_time.timestep_split import DEFAULT_EARLY, DEFAULT_LATE, DEFAULT_SWITCH, TimestepSplit

__all__ = ["DEFAULT_EARLY", "DEFAULT_LATE", "DEFAULT_SWITCH", "TimestepSplit"]
