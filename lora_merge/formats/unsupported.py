"""Recognise adapters lora-merge cannot read (LyCORIS Tucker LoCon/GLoRA, DoRA without the base weights, OFT,
IA3, ...).  LoHa, LoKr and full ``diff`` modules are read by :mod:`lora_merge.formats.lycoris`, bias deltas
(``diff_b``) by :mod:`lora_merge.formats.bias`.

They are refused with one line naming what was found, never half-read.
"""
from __future__ import annotations

import re

from ..errors import UnsupportedAdapterError

#: (display name, regex on the key's last components) — first match wins
_MARKERS: list[tuple[str, re.Pattern[str]]] = [
    ("LyCORIS Tucker LoCon", re.compile(r"\.(lora_mid)(\.|$)")),
    ("DoRA", re.compile(r"\.(dora_scale|lora_magnitude_vector)(\.|$)")),
    ("OFT", re.compile(r"\.(oft_blocks|oft_r|oft_s|oft_diag)(\.|$)")),
    ("BOFT", re.compile(r"\.(boft_R|boft_s)(\.|$)")),
    ("LyCORIS GLoRA", re.compile(r"\.(a1|a2|b1|b2)\.weight$")),
    ("IA3", re.compile(r"\.(ia3_l|on_input)(\.|$)")),
    ("VeRA", re.compile(r"\.(vera_lambda_[ab])(\.|$)")),
    ("LoRA with trained biases", re.compile(r"\.(lora_B|lora_up)\.(?:[^.]+\.)?(bias)$")),
]

_MAX_SHOWN = 3


def find_unsupported(keys) -> tuple[str, list[str]] | None:
    """``(kind, sorted distinct marker names)`` for the first non-LoRA kind found, else None."""
    found: dict[str, set[str]] = {}
    for key in keys:
        for kind, rx in _MARKERS:
            m = rx.search(key)
            if m:
                found.setdefault(kind, set()).add(m.group(1) if kind != "LoRA with trained biases"
                                                  else f"{m.group(1)}.bias")
                break
    if not found:
        return None
    kind = next(k for k, _ in _MARKERS if k in found)
    return kind, sorted(found[kind])


def check_supported(keys, path=None, config: dict | None = None) -> None:
    """Raise :class:`UnsupportedAdapterError` for non-LoRA adapters (by key names or PEFT config)."""
    if config is not None:
        ptype = str(config.get("peft_type") or "LORA").upper()
        if ptype != "LORA":
            raise UnsupportedAdapterError(f"PEFT {ptype} adapter (peft_type {ptype}), not a plain LoRA", path)
        if config.get("use_dora"):
            raise UnsupportedAdapterError("DoRA adapter (use_dora: true): its update depends on the base model's "
                                          "weights, which the file does not hold (pass --base-weights FILE, the base "
                                          "model's .safetensors, to make it exact); not a plain LoRA", path)
    hit = find_unsupported(keys)
    if hit is None:
        return
    kind, names = hit
    if kind == "DoRA":
        raise UnsupportedAdapterError(
            f"DoRA adapter ({', '.join(names)}): its update W' = m·(W+ΔW)/‖W+ΔW‖ − W depends on the base model's "
            "weights W, which the file does not hold (pass --base-weights FILE, the base model's .safetensors, "
            "to make it exact); not a plain LoRA", path)
    shown = ", ".join(names[:_MAX_SHOWN]) + (", …" if len(names) > _MAX_SHOWN else "")
    what = "adapter" if not kind.startswith("LoRA with") else "file"
    raise UnsupportedAdapterError(f"{kind} {what} ({shown}), not a plain LoRA", path)
