"""Which dialect a set of tensor keys is written in."""
from __future__ import annotations

from ..errors import FormatError
from . import diffusers as _diffusers
from . import kohya as _kohya
from .names import TE_PREFIXES, UNET_PREFIX
from .peft import PREFIX as _PEFT_PREFIX

DIALECTS = ("kohya", "diffusers", "peft")


def _is_kohya(key: str) -> bool:
    split = _kohya._split(key)
    if split is None:
        return False
    return key.startswith((UNET_PREFIX, *TE_PREFIXES, "lora_")) or split[1] != "alpha"


def detect_dialect(keys, metadata: dict[str, str] | None = None) -> str:
    """``"kohya"``, ``"diffusers"`` or ``"peft"`` by majority of recognised keys.

    Raises :class:`FormatError` when no key fits any dialect."""
    votes = {d: 0 for d in DIALECTS}
    for key in keys:
        if key.startswith(_PEFT_PREFIX):
            votes["peft"] += 1
        elif _is_kohya(key):
            votes["kohya"] += 1
        elif _diffusers.parse_key(key) is not None:
            votes["diffusers"] += 1
    best = max(DIALECTS, key=lambda d: votes[d])
    if votes[best] == 0:
        raise FormatError("no LoRA keys found (not a kohya, diffusers or PEFT LoRA file)")
    return best
