"""Helpers shared by the dialect readers and writers."""
from __future__ import annotations

import collections
import functools
import math
import re

import torch

from ..adapter import Adapter, LoraModule, TensorRef
from ..errors import FormatError

#: metadata keys that describe one file's layout; writers regenerate them, never copy them
LAYOUT_METADATA_KEYS = ("lora_adapter_metadata", "lora_merge.kohya_names", "format")

#: ``LoraConfig``'s defaults for ``r`` and ``lora_alpha`` (what a PEFT config or diffusers'
#: ``lora_adapter_metadata`` means when it leaves them out)
PEFT_DEFAULT_R, PEFT_DEFAULT_ALPHA = 8, 8


def make_module(name: str, down: TensorRef | None, up: TensorRef | None, path, source_key: str,
                alpha: float | None = None, scale_rule: str = "standard") -> LoraModule:
    """Validate one A/B pair's shapes and build the module."""
    if down is None and up is None:
        raise FormatError(f"module {source_key}: no LoRA factors", path)
    if down is None:
        raise FormatError(f"module {source_key}: up (B) weight without a down (A) weight", path)
    if up is None:
        raise FormatError(f"module {source_key}: down (A) weight without an up (B) weight", path)
    ds, us = tuple(down.shape), tuple(up.shape)
    for t, what in ((down, "down (A)"), (up, "up (B)")):
        if not t.dtype.is_floating_point:
            raise FormatError(f"module {source_key}: {what} weight has non-float dtype {t.dtype}", path)
    ok = (len(ds) == 2 and len(us) == 2) or (len(ds) == 4 and len(us) == 4 and us[2:] == (1, 1))
    if not ok:
        raise FormatError(f"module {source_key}: A/B shape mismatch (down {list(ds)}, up {list(us)}): "
                          "expected 2-D factors or 4-D conv factors with a 1×1 up", path)
    if us[1] != ds[0]:
        raise FormatError(f"module {source_key}: A/B shape mismatch: down (A) has rank {ds[0]} "
                          f"but up (B) has rank {us[1]} (down {list(ds)}, up {list(us)})", path)
    if alpha is not None and not math.isfinite(alpha):
        raise FormatError(f"module {source_key}: alpha is {alpha}", path)
    return LoraModule(name=name, down=down, up=up, alpha=alpha, scale_rule=scale_rule,  # type: ignore[arg-type]
                      source_key=source_key)


def read_scalar(ref: TensorRef, path, key: str) -> float:
    if ref.numel != 1:
        raise FormatError(f"{key}: alpha must be a single number, got shape {list(ref.shape)}", path)
    v = float(ref.load().reshape(()).item())
    if not math.isfinite(v):
        raise FormatError(f"{key}: alpha is {v}", path)
    return v


@functools.lru_cache(maxsize=16384)
def _pattern_rx(key: str) -> re.Pattern | None:
    """PEFT's pattern regex for ``key``, compiled once (``re``'s own cache holds 512: files with more pattern
    keys recompiled every key for every module), None when ``key`` is not a valid regex."""
    try:
        return re.compile(rf"(.*\.)?({key})$")
    except re.error:
        return None


def pattern_value(patterns: dict | None, name: str):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``)."""
    for key, value in (patterns or {}).items():
        rx = _pattern_rx(key)
        if rx is None:
            if name == key or name.endswith("." + key):
                return value
        elif rx.match(name):
            return value
    return None


def num(x: float) -> float | int:
    """JSON-friendly number: ints stay ints (``16`` not ``16.0``)."""
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def standard_alpha(m: LoraModule) -> float:
    """Alpha under the standard rule that gives the module's current scale."""
    if m.scale_rule == "rslora":
        return m.effective_alpha * math.sqrt(m.rank)
    return m.effective_alpha


def _pattern(name: str, all_names) -> str:
    r"""The rank/alpha pattern key of ``name``: PEFT matches ``(.*\.)?(key)$``, so a name that is the dotted
    tail of another (Flux's top-level ``proj_out`` and ``single_transformer_blocks.0.proj_out``) is
    anchored with ``^``."""
    key = re.escape(name)
    return "^" + key if any(o.endswith("." + name) for o in all_names) else key


def lora_config_for(modules: list[tuple[str, LoraModule]], *, allow_rslora: bool = True) -> dict:
    """LoraConfig fields (``r``, ``lora_alpha``, patterns, ``use_rslora``, ``target_modules``) that reproduce
    every module's scale exactly. ``modules`` are ``(name relative to the model, module)``."""
    rslora = allow_rslora and bool(modules) and all(m.scale_rule == "rslora" for _, m in modules)
    alphas = {n: (m.effective_alpha if rslora else standard_alpha(m)) for n, m in modules}
    ranks = {n: m.rank for n, m in modules}
    r = collections.Counter(ranks.values()).most_common(1)[0][0] if ranks else PEFT_DEFAULT_R
    a = collections.Counter(alphas.values()).most_common(1)[0][0] if alphas else r
    return {
        "r": int(r),
        "lora_alpha": num(a),
        "rank_pattern": {_pattern(n, ranks): int(v) for n, v in ranks.items() if v != r},
        "alpha_pattern": {_pattern(n, ranks): num(v) for n, v in alphas.items() if v != a},
        "use_rslora": rslora,
        "target_modules": sorted(n for n, _ in modules),
    }


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not t.dtype.is_floating_point:
        return t
    return t.to(dtype)


def carried_metadata(adapter: Adapter, extra: dict[str, str] | None) -> dict[str, str]:
    md = {k: v for k, v in (adapter.metadata or {}).items() if k not in LAYOUT_METADATA_KEYS}
    md.update(extra or {})
    md["format"] = "pt"
    return md
