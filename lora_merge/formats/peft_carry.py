"""What a PEFT adapter needs beyond its LoRA factors, carried through the single-file dialects so that
PEFT → kohya/diffusers → PEFT restores the adapter (docs/formats.md, "PEFT round trips").

- The ``adapter_config.json`` fields (``task_type``, ``fan_in_fan_out``, ``base_model_name_or_path``,
  ``modules_to_save``, …) go into the file's metadata as JSON under :data:`PEFT_CONFIG_KEY`; reading
  the file gives the adapter that config back, and the PEFT writer starts from it (``r``,
  ``lora_alpha``, the patterns and ``use_rslora`` are always regenerated from the modules).
- The ``modules_to_save`` tensors (classifier heads) are written, when asked (``keep_heads``), as
  tensors named ``lora_merge.modules_to_save.<name>`` that no LoRA loader reads as a module; reading the
  file puts them back into ``adapter.extra_tensors``.  Without ``keep_heads`` they are left out, with a
  warning.
"""

from __future__ import annotations

import json

import torch

from ..adapter import Adapter, TensorRef

__all__ = ["HEAD_PREFIX", "PEFT_CONFIG_KEY", "carried_config", "head_tensors", "restore", "split_heads"]

PEFT_CONFIG_KEY = "lora_merge.peft_config"
HEAD_PREFIX = "lora_merge.modules_to_save."


def carried_config(adapter: Adapter) -> dict[str, str]:
    """Metadata that carries ``adapter``'s PEFT config (empty when it has none)."""
    cfg = adapter.config
    if not cfg or "peft_type" not in cfg:
        return {}
    return {PEFT_CONFIG_KEY: json.dumps(cfg, sort_keys=True, default=str)}


def head_tensors(adapter: Adapter, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The ``modules_to_save`` tensors under :data:`HEAD_PREFIX` (cast to ``dtype`` when given)."""
    out = {}
    for name, ref in adapter.extra_tensors.items():
        t = ref.load()
        out[HEAD_PREFIX + name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def split_heads(refs: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], dict[str, TensorRef]]:
    """``(the other tensors, the carried heads by their own name)``."""
    heads = {k[len(HEAD_PREFIX):]: v for k, v in refs.items() if k.startswith(HEAD_PREFIX)}
    if not heads:
        return refs, {}
    return {k: v for k, v in refs.items() if not k.startswith(HEAD_PREFIX)}, heads


def restore(adapter: Adapter, heads: dict[str, TensorRef]) -> Adapter:
    """Put carried heads and the carried PEFT config back onto a freshly read adapter."""
    for name, ref in heads.items():
        adapter.extra_tensors.setdefault(name, ref)
    text = (adapter.metadata or {}).get(PEFT_CONFIG_KEY)
    if text and not (adapter.config and "peft_type" in adapter.config):
        try:
            cfg = json.loads(text)
        except ValueError:
            cfg = None
        if isinstance(cfg, dict):
            adapter.config = cfg
    return adapter
