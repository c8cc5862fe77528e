"""Recipe files (YAML, JSON or TOML) that hold everything ``lora-merge merge`` takes on its command line.

Keys (all optional; command-line flags override them)::

    inputs: [a.safetensors, {path: b.safetensors, sha256: ...}]   # relative to the recipe's folder
    output: merged.safetensors
    strategy: ties
    weights: [0.7, 0.3]                 # or "0.7,0.3"
    layer_weights: ["up_blocks.0.attentions.1=0", ...]   # or {pattern: w} or [[pattern, w], ...]
    params: {density: 0.4}              # strategy parameters; may also be given at the top level
    rank: 32
    to: kohya
    dtype: fp16
    device: cpu
    seed: 0
    force: false
    keep_heads_from: 1                  # 1-based, as --keep-heads-from
    arch: sdxl
    report: report.json
    version: 0.1.0                      # informational (written by lora-merge into merged files)

The ``lora_merge.recipe`` metadata of a merged file is a valid recipe: the merge can be replayed from it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import MergeError, UsageError

RECIPE_KEYS = (
    "inputs",
    "output",
    "strategy",
    "weights",
    "layer_weights",
    "params",
    "rank",
    "to",
    "dtype",
    "device",
    "seed",
    "force",
    "keep_heads_from",
    "arch",
    "report",
    "threads",
    "version",
)


def _parse_text(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"bad TOML recipe: {exc}", path) from None
    import yaml  # YAML is a superset of JSON

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"bad YAML recipe: {str(exc).splitlines()[0]}", path) from None


def _param_names() -> set[str]:
    from .strategies import available_strategies

    return {p.name for cls in available_strategies().values() for p in cls.params}


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a recipe file; returns a dict with :data:`RECIPE_KEYS` keys (those present).

    Input paths are made relative to the recipe's folder; strategy parameters given at the top level are
    moved into ``params``.  Unknown keys raise :class:`UsageError`.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError("recipe file not found", path)
    data = _parse_text(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError("a recipe must be a mapping of keys to values", path)
    params = dict(data.pop("params", None) or {})
    if not isinstance(params, dict):
        raise UsageError("'params' must be a mapping", path)
    known_params = _param_names()
    out: dict[str, Any] = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k in RECIPE_KEYS:
            out[k] = value
        elif k in known_params:
            params[k] = value
        else:
            raise UsageError(f"unknown recipe key {key!r} (keys: {', '.join(RECIPE_KEYS)})", path)
    if params:
        out["params"] = params
    base = path.parent
    if "inputs" in out:
        out["inputs"] = [_input_entry(x, base, path) for x in _as_list(out["inputs"], "inputs", path)]
    for k in ("output", "report"):
        if out.get(k) is not None:
            out[k] = str(_rel(out[k], base))
    if "weights" in out:
        out["weights"] = _weights(out["weights"], path)
    if "layer_weights" in out:
        out["layer_weights"] = _layer_weights(out["layer_weights"], path)
    return out


def _as_list(value: Any, key: str, path: Path) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise UsageError(f"{key!r} must be a list", path)


def _rel(p: str | os.PathLike, base: Path) -> Path:
    p = Path(os.path.expanduser(os.fspath(p)))
    return p if p.is_absolute() else base / p


def _input_entry(item: Any, base: Path, path: Path) -> dict[str, Any]:
    if isinstance(item, (str, os.PathLike)):
        return {"path": str(_rel(item, base))}
    if isinstance(item, dict) and "path" in item:
        extra = set(item) - {"path", "sha256", "dialect"}
        if extra:
            raise UsageError(f"unknown key {min(extra)!r} in an input entry (keys: path, sha256)", path)
        return {"path": str(_rel(item["path"], base)), "sha256": item.get("sha256")}
    raise UsageError(f"bad input entry {item!r}: expected a path or {{path: ..., sha256: ...}}", path)


def _weights(value: Any, path: Path) -> list[float]:
    items = value.split(",") if isinstance(value, str) else _as_list(value, "weights", path)
    try:
        return [float(x) for x in items]
    except (TypeError, ValueError):
        raise UsageError(f"'weights' must be numbers, got {value!r}", path) from None


def _layer_weights(value: Any, path: Path) -> list:
    from .engine import parse_layer_weight

    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = _as_list(value, "layer_weights", path)
    out = []
    for it in items:
        if isinstance(it, str):
            out.append(parse_layer_weight(it))
        elif isinstance(it, (list, tuple)) and len(it) == 2:
            pat, val = it
            try:
                val = [float(v) for v in val] if isinstance(val, (list, tuple)) else float(val)
            except (TypeError, ValueError):
                raise UsageError(f"layer weight for {pat!r} must be a number or a list", path) from None
            out.append((str(pat), val))
        else:
            raise UsageError(f"bad layer weight {it!r}: expected 'PATTERN=W' or [PATTERN, W]", path)
    return out


def verify_inputs(entries: list[dict[str, Any]]) -> list[str]:
    """Paths of the recipe's inputs, checking any recorded sha256 against the file."""
    from .engine import input_sha256

    paths = []
    for e in entries:
        want = e.get("sha256")
        if want:
            got = input_sha256(e["path"])
            if got is not None and got != want:
                raise MergeError(f"sha256 {got[:12]}… does not match the recipe's {want[:12]}…", e["path"])
        paths.append(e["path"])
    return paths
