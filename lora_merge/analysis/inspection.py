"""Summaries of one adapter: what ``lora-merge inspect`` shows, as a plain JSON-able dict.

:func:`summarize` reads only the header facts (names, shapes, dtypes, alphas, metadata) unless
``modules=True``, which loads each module's factors to compute ‖ΔW‖_F and the effective rank from
the factors (a QR + small core SVD per module; never a dense SVD of ΔW).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .. import arch, linalg
from ..adapter import Adapter, LoraModule
from ..files import dtype_name
from ..formats.dit_arch import family_summary

#: metadata key under which lora-merge stores the exact merge recipe (JSON)
RECIPE_KEY = "lora_merge.recipe"

#: adapter_config.json fields worth showing to people (everything is in ``config`` for machines)
CONFIG_FIELDS = (
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "use_rslora",
    "fan_in_fan_out",
    "target_modules",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
)

# kohya values that look numeric but are identifiers
_KOHYA_STRING_SUFFIXES = ("_hash", "_name", "_comment", "_title", "_commit", "_version", "_id")


def parse_kohya_value(key: str, value: str) -> Any:
    """Type one kohya ``ss_*`` string: bools, None, ints, floats and JSON objects/lists.

    Hashes, names and versions stay strings even when they are all digits.
    """
    v = value.strip()
    if key.endswith(_KOHYA_STRING_SUFFIXES):
        return value
    if v in ("True", "true"):
        return True
    if v in ("False", "false"):
        return False
    if v in ("None", "null"):
        return None
    if v[:1] in ("{", "["):
        try:
            return json.loads(v)
        except ValueError:
            return value
    try:
        return int(v)
    except ValueError:
        pass
    try:
        f = float(v)
    except ValueError:
        return value
    return f if math.isfinite(f) else value


def split_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """Group safetensors metadata: kohya ``ss_*``/``sshs_*`` (typed), ``modelspec.*``, the merge recipe,
    diffusers' ``lora_adapter_metadata`` (parsed), and everything else verbatim."""
    kohya: dict[str, Any] = {}
    modelspec: dict[str, str] = {}
    other: dict[str, Any] = {}
    recipe: Any = None
    recipe_error: str | None = None
    for key in sorted(metadata):
        value = metadata[key]
        if key.startswith("ss_"):
            kohya[key] = parse_kohya_value(key, value)
        elif key.startswith("sshs_"):
            kohya[key] = value
        elif key.startswith("modelspec."):
            modelspec[key] = value
        elif key == RECIPE_KEY:
            try:
                recipe = json.loads(value)
            except ValueError as exc:
                recipe, recipe_error = value, f"recipe is not valid JSON: {exc}"
        elif key == "lora_adapter_metadata":
            try:
                other[key] = json.loads(value)
            except ValueError:
                other[key] = value
        else:
            other[key] = value
    out: dict[str, Any] = {"kohya": kohya, "modelspec": modelspec, "recipe": recipe, "other": other}
    if recipe_error:
        out["recipe_error"] = recipe_error
    return out


def histogram(values) -> list[dict[str, Any]]:
    """``[{"value": v, "count": n}, ...]`` sorted by value."""
    counts = Counter(values)
    return [{"value": v, "count": counts[v]} for v in sorted(counts)]


def _num(x: float) -> int | float:
    """Whole-number floats print as ints (alpha 4.0 → 4)."""
    return int(x) if float(x).is_integer() else float(x)


def file_size(source: Path | str | None) -> int | None:
    """Bytes on disk: the file, or for a PEFT folder its adapter weights and config."""
    if source is None:
        return None
    p = Path(source)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and (f.name.startswith("adapter_model") or f.name == "adapter_config.json")]
        return sum(f.stat().st_size for f in files)
    return None


def module_stats(m: LoraModule) -> dict[str, Any]:
    """Loads one module's factors: ‖ΔW‖_F, singular values and entropy effective rank (fp32, from factors)."""
    b, a = m.factors()
    s = linalg.singular_values(b, a) * abs(m.scale)
    return {
        "norm": float(s.pow(2).sum().sqrt()),
        "effective_rank": linalg.effective_rank(s),
        "sigma_max": float(s[0]) if s.numel() else 0.0,
    }


def module_row(m: LoraModule, *, with_stats: bool = True) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": m.name,
        "block": arch.block_of(m.name),
        "kind": m.kind,
        "rank": m.rank,
        "alpha": _num(m.effective_alpha),
        "alpha_stored": m.alpha is not None,
        "scale": m.scale,
        "shape": list(m.weight_shape),
        "dtype": dtype_name(m.dtype),
        "params": m.num_params,
    }
    if m.source_key:
        row["source_key"] = m.source_key
    if m.bias is not None:
        row["bias_delta"] = list(m.bias.shape)
    if with_stats:
        row.update(module_stats(m))
    return row


def summarize(adapter: Adapter, *, modules: bool = False, progress=None, arch_name: str | None = None) -> dict[str, Any]:
    """Everything ``inspect`` reports about ``adapter`` as a JSON-able dict.

    ``modules=True`` adds ``"modules"``: one row per module with ‖ΔW‖_F and effective rank (loads
    the tensors).  ``progress`` is an optional callable wrapping the module iterable (a progress bar).
    """
    mods = list(adapter)
    guess = arch_name or arch.guess_arch(adapter)
    blocks: dict[str, dict[str, Any]] = {}
    for m in mods:
        blk = blocks.setdefault(arch.block_of(m.name), {"modules": 0, "params": 0, "ranks": set(), "kinds": set()})
        blk["modules"] += 1
        blk["params"] += m.num_params
        blk["ranks"].add(m.rank)
        blk["kinds"].add(m.kind)
    block_rows = [
        {"block": name, "modules": b["modules"], "params": b["params"], "ranks": sorted(b["ranks"]),
         "kinds": sorted(b["kinds"])}
        for name, b in sorted(blocks.items(), key=lambda kv: _block_sort_key(kv[0]))
    ]
    dtypes = Counter(dtype_name(t.dtype) for m in mods for t in (m.down, m.up))
    dtypes.update(dtype_name(t.dtype) for t in adapter.extra_tensors.values())
    ranks = [m.rank for m in mods]
    alphas = [_num(m.effective_alpha) for m in mods]
    scales = [m.scale for m in mods]
    config = adapter.config or {}
    out: dict[str, Any] = {
        "file": os.fspath(adapter.source) if adapter.source is not None else None,
        "file_size": file_size(adapter.source),
        "dialect": adapter.dialect,
        "dialect_variant": adapter.dialect_variant,
        "architecture": guess,
        "architecture_name": arch.ARCH_NAMES.get(guess, guess) if guess else None,
        "dit": family_summary(adapter, guess),
        "num_modules": len(mods),
        "num_params": adapter.num_params,
        "lora_params": sum(m.num_params for m in mods),
        "components": dict(sorted(Counter(arch.component_of(m.name) for m in mods).items())),
        "kinds": dict(sorted(Counter(m.kind for m in mods).items())),
        "blocks": block_rows,
        "ranks": _value_summary(ranks),
        "alphas": {**_value_summary(alphas), "stored": any(m.alpha is not None for m in mods)},
        "scales": _value_summary(scales),
        "scale_rules": dict(Counter(m.scale_rule for m in mods)),
        "dtypes": dict(sorted(dtypes.items())),
        "extra_tensors": [
            {"name": k, "shape": list(t.shape), "dtype": dtype_name(t.dtype), "params": t.numel}
            for k, t in sorted(adapter.extra_tensors.items())
        ],
        "modules_to_save": _unique(config.get("modules_to_save")),
        "fan_in_fan_out": config.get("fan_in_fan_out"),
        "unparsed_keys": list(adapter.unparsed_keys),
        #: modules with a bias delta (diff_b): added to the layer's bias, no LoRA scale
        "bias_deltas": sum(m.bias is not None for m in mods),
        "config": adapter.config,
        "metadata": split_metadata(adapter.metadata or {}),
    }
    out["recipe"] = out["metadata"]["recipe"]
    if modules:
        it = progress(mods) if progress is not None else mods
        out["modules"] = [module_row(m) for m in it]
    return out


def _unique(v):
    if v is None:
        return None
    seen: list = []
    for x in v:
        if x not in seen:
            seen.append(x)
    return seen


def _value_summary(values: list) -> dict[str, Any]:
    if not values:
        return {"min": None, "max": None, "mixed": False, "histogram": []}
    return {"min": min(values), "max": max(values), "mixed": len(set(values)) > 1, "histogram": histogram(values)}


def _block_sort_key(name: str):
    """Natural order: components in model order, then down/mid/up blocks, numbers numerically."""
    comp_order = {"unet": 0, "transformer": 0, "text_encoder": 1, "text_encoder_2": 2}
    comp = name.split(".", 1)[0]
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    parts = name.split(".")
    key: list = [comp_order.get(comp, 3)]
    for p in parts[1:] if comp in comp_order else parts:
        key.append((0, stage[p], "") if p in stage else (1, int(p), "") if p.isdigit() else (2, 0, p))
    return key
