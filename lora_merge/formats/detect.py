"""Which dialect a set of tensor keys is written in."""
from __future__ import annotations

from ..errors import FormatError
from . import diffusers as _diffusers
from . import kohya as _kohya
from .names import TE_PREFIXES, UNET_PREFIX
from .peft import PREFIX as _PEFT_PREFIX

DIALECTS = ("kohya", "diffusers", "peft")


def detect_dialect(keys, metadata: dict[str, str] | None = None) -> str:
    """``"kohya"``, ``"diffusers"`` or ``"peft"`` by majority of recognised keys; FormatError when none fits."""
    votes = {d: 0 for d in DIALECTS}
    for key in keys:
        if key.startswith(_PEFT_PREFIX):
            votes["peft"] += 1
        elif key.startswith((UNET_PREFIX, *TE_PREFIXES, "lora_")) and _kohya._split(key) is not None:
            votes["kohya"] += 1
        elif _kohya._split(key) is not None and key.split(".", 1)[1] != "alpha":
            votes["kohya"] += 1
        elif _diffusers.parse_key(key) is not None:
            votes["diffusers"] += 1
    best = max(DIALECTS, key=lambda d: votes[d])
    if votes[best] == 0:
        raise FormatError("no LoRA keys found (not a kohya, diffusers or PEFT LoRA file)")
    return best
