"""The merge recipe: the one owner of every merge setting, and the options for how to run it.

A :class:`Recipe` says *what* to merge (inputs, strategy and its parameters, weights, rank, output
dialect and dtype, seed, …); :class:`MergeOptions` says *how* to run it (device, threads, progress
callback), which never changes the result.  A recipe comes from a file (YAML, JSON or TOML), from a
merged file's ``lora_merge.recipe`` metadata, or from keyword arguments, and is changed with
:meth:`Recipe.with_overrides` (the CLI's flags).  :meth:`Recipe.to_metadata` is what a merged file
records, so a merge can be replayed from its output.

Recipe-file keys (all optional; command-line flags override them)::

    inputs: [a.safetensors, {path: b.safetensors, sha256: ...}]   # relative to the recipe's folder
    output: merged.safetensors
    strategy: ties
    weights: [0.7, 0.3]                 # or "0.7,0.3"
    layer_weights: ["up_blocks.0.attentions.1=0", ...]   # or {pattern: w} or [[pattern, w], ...]
    params: {density: 0.4}              # strategy parameters; may also be given at the top level
    rank: 32
    full_rank: false                    # ties/dare/magnitude-prune: keep every direction (large files)
    to: kohya
    dtype: fp16
    seed: 0
    force: false
    record_paths: false                 # full input paths in the merged file (default: names only)
    allow_mixed_arch: false             # merge inputs whose detected base models differ
    base_weights: flux1-dev.safetensors # the base model's weights: DoRA inputs merge exactly (or {path, sha256})
    keep_heads_from: 1                  # 1-based, as --keep-heads-from
    arch: sdxl
    report: report.json
    device: cpu                         # how to run (MergeOptions)
    threads: 2
    version: 0.1.0                      # informational (written by lora-merge into merged files)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import FormatError, MergeError, UsageError, quoted
from ..files import dtype_name, input_sha256, open_input, parse_dtype
from ..formats.api import load
from ..patterns import compile_pattern
from ..strategies import MergeStrategy, available_strategies, get_strategy

__all__ = ["RECIPE_KEYS", "MergeOptions", "Recipe", "parse_layer_weight", "read_recipe_file", "recorded_name"]

#: metadata key of the recipe in a merged file
METADATA_KEY = "lora_merge.recipe"

#: a progress callback: ``(layers done, layers in all, name of the last layer)``
ProgressFn = Callable[[int, int, str], None]

Input = str | os.PathLike | Adapter


def recorded_name(path: str | os.PathLike) -> str:
    """How a merged file names an input without leaking the user's folders: the file name (a PEFT
    folder's name; ``folder/adapter_model.safetensors`` for a file inside one)."""
    p = Path(os.fspath(path))
    if p.name.startswith("adapter_model.") and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name or os.fspath(path)


def parse_layer_weight(spec: str) -> tuple[str, float | list[float]]:
    """``'PATTERN=W'`` or ``'PATTERN=W1,W2,…'`` (one weight per input) → ``(pattern, value)``."""
    pattern, sep, value = str(spec).rpartition("=")
    if not sep or not pattern.strip() or not value.strip():
        raise UsageError(f"--weight {spec!r}: expected PATTERN=W or PATTERN=W1,W2,...")
    try:
        vals = [float(v) for v in value.split(",")]
    except ValueError:
        raise UsageError(f"--weight {spec!r}: {value!r} is not a number or a comma-separated list") from None
    return pattern.strip(), vals[0] if len(vals) == 1 else vals


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge; none of these changes the output bytes."""

    device: str = "cpu"
    #: layers finished side by side on the CPU (None: every CPU this process may use)
    threads: int | None = None
    progress: ProgressFn | None = None
    #: also read pickle inputs (.bin/.pt/.ckpt) with ``torch.load(weights_only=True)``; a trust decision
    #: made on the command line (``--allow-pickle``) or by the caller, never read from a recipe file
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or int(t) != t or t < 1):
            raise UsageError(f"--threads must be a positive integer, got {t!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeOptions:
        """The run keys (``device``, ``threads``) of a recipe file."""
        return cls(device=data.get("device") or "cpu", threads=data.get("threads"))

    def with_overrides(self, **kw: Any) -> MergeOptions:
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def torch_device(self) -> torch.device:
        if not isinstance(self.device, (str, torch.device)):
            raise UsageError(f"'device' must be a device name such as cpu or cuda:0, got {quoted(self.device, 60)}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError, ValueError):
            raise UsageError(f"unknown device {quoted(self.device, 60)}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda requested but CUDA is not available")
        return dev


@dataclass(frozen=True)
class Recipe:
    """Every setting of a merge.  ``inputs`` are paths or in-memory adapters; ``sha256`` the hashes a
    recipe file or a merged file recorded for them (checked before merging)."""

    inputs: tuple[Input, ...] = ()
    output: str | None = None
    strategy: str = "linear"
    params: dict[str, Any] = field(default_factory=dict)
    weights: tuple[float, ...] | None = None
    layer_weights: tuple[tuple[str, float | tuple[float, ...]], ...] = ()
    rank: int | None = None
    #: dense strategies (ties, dare, magnitude-prune) keep every direction instead of the sum of the input ranks
    full_rank: bool = False
    to: str | None = None
    dtype: str | None = None
    seed: int = 0
    force: bool = False
    keep_heads_from: int | None = None  # 1-based
    arch: str | None = None
    report: str | None = None
    #: record the inputs' full paths in the merged file (default: file names only, see :func:`recorded_name`)
    record_paths: bool = False
    #: merge inputs whose detected base models differ (refused by default)
    allow_mixed_arch: bool = False
    #: the base model's weights (a model ``.safetensors``) that make DoRA inputs exact dense updates
    #: (:mod:`lora_merge.formats.dora`); recorded with its sha256 when an input had DoRA modules
    base_weights: str | None = None
    sha256: tuple[str | None, ...] = ()
    #: the sha256 a recipe recorded for ``base_weights`` (checked before merging)
    base_weights_sha256: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path | None = None) -> Recipe:
        """A recipe from a mapping with :data:`RECIPE_KEYS` (the run keys are ignored here: see
        :meth:`MergeOptions.from_dict`).  Values are checked for type; counts against the inputs in
        :meth:`validate`."""
        entries = [_input_entry(x, path) for x in _as_list(data.get("inputs", []), "inputs", path)]
        kw: dict[str, Any] = {
            "inputs": tuple(e["path"] for e in entries),
            "sha256": tuple(e.get("sha256") for e in entries),
        }
        for k in ("output", "report", "to", "dtype", "arch"):
            if data.get(k) is not None:
                kw[k] = str(data[k])
        if data.get("strategy") is not None:
            kw["strategy"] = str(data["strategy"])
        if data.get("params") is not None:
            if not isinstance(data["params"], dict):
                raise UsageError("'params' must be a mapping", path)
            kw["params"] = dict(data["params"])
        if data.get("weights") is not None:
            kw["weights"] = _weights(data["weights"], path)
        if data.get("layer_weights") is not None:
            kw["layer_weights"] = _layer_weights(data["layer_weights"], path)
        for k in ("rank", "seed", "keep_heads_from"):
            if data.get(k) is not None:
                kw[k] = _int(data[k], k, path)
        for k in ("force", "record_paths", "allow_mixed_arch", "full_rank"):
            if data.get(k) is not None:
                kw[k] = bool(data[k])
        if data.get("base_weights") is not None:
            bw = _input_entry(data["base_weights"], path)
            if isinstance(bw["path"], Adapter):
                raise UsageError("'base_weights' must be a path to a model .safetensors", path)
            kw["base_weights"], kw["base_weights_sha256"] = bw["path"], bw.get("sha256")
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Recipe:
        """A recipe file (YAML, JSON or TOML); input, output and report paths are relative to its folder."""
        return cls.from_dict(read_recipe_file(path), Path(path))

    @classmethod
    def from_metadata(cls, source: str | os.PathLike | Adapter | dict[str, str]) -> Recipe:
        """The recipe a merged file recorded (a path, a loaded :class:`Adapter` or its metadata dict)."""
        if isinstance(source, dict):
            md, where = source, None
        elif isinstance(source, Adapter):
            md, where = source.metadata, source.source
        else:
            ad = load(source)
            md, where = ad.metadata, source
        text = md.get(METADATA_KEY)
        if not text:
            raise UsageError(f"no {METADATA_KEY} metadata: not a file merged by lora-merge", where)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{METADATA_KEY} metadata is not valid JSON ({exc.msg})", where) from None
        if not isinstance(data, dict):
            raise UsageError(f"{METADATA_KEY} metadata is not a mapping", where)
        data.pop("version", None)
        _fill_recorded_defaults(data)
        return cls.from_dict(data)

    def with_overrides(self, **kw: Any) -> Recipe:
        """A copy with the given settings replaced (``None`` leaves a setting as it is); ``params`` are
        merged key by key, ``layer_weights`` appended."""
        kw = {k: v for k, v in kw.items() if v is not None}
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UsageError(f"unknown recipe setting {min(unknown)!r}")
        if "params" in kw:
            kw["params"] = {**self.params, **kw["params"]}
        if "layer_weights" in kw:
            kw["layer_weights"] = self.layer_weights + _layer_weights(kw["layer_weights"], None)
        if "weights" in kw:
            kw["weights"] = _weights(kw["weights"], None)
        if "inputs" in kw:
            kw["inputs"] = tuple(kw["inputs"])
            if "sha256" not in kw and len(kw["inputs"]) != len(self.sha256):
                kw["sha256"] = ()
        if "base_weights" in kw:
            kw["base_weights"] = os.fspath(kw["base_weights"])
            if "base_weights_sha256" not in kw and kw["base_weights"] != self.base_weights:
                kw["base_weights_sha256"] = None
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ checks
    def build_strategy(self) -> MergeStrategy:
        return get_strategy(self.strategy)(**self.params)

    def validate(self, strategy: MergeStrategy | None = None) -> None:
        """Check the settings against each other and the number of inputs (before any work)."""
        n = len(self.inputs)
        if not n:
            raise UsageError("no inputs to merge")
        strat = strategy or get_strategy(self.strategy)
        if n < strat.min_inputs or (strat.max_inputs is not None and n > strat.max_inputs):
            want = f"{strat.min_inputs}" + ("+" if strat.max_inputs is None else f"–{strat.max_inputs}")
            if strat.max_inputs == strat.min_inputs:
                want = str(strat.min_inputs)
            raise UsageError(f"strategy {strat.name!r} takes {want} input(s), got {n}")
        self.resolved_weights()
        self.resolved_layer_weights()
        if self.rank is not None and (int(self.rank) != self.rank or self.rank < 1):
            raise UsageError(f"--rank must be a positive integer, got {self.rank!r}")
        if self.rank is not None and self.full_rank:
            raise UsageError("--rank and --full-rank exclude each other")
        parse_dtype(self.dtype)
        k = self.keep_heads_from
        if k is not None and not 1 <= k <= n:
            raise UsageError(f"--keep-heads-from {k}: there are only {n} inputs")
        if self.sha256 and len(self.sha256) != n:
            raise UsageError(f"{len(self.sha256)} sha256 value(s) for {n} input(s)")

    def verify_inputs(self) -> None:
        """Check every recorded sha256 against its input file."""
        for inp, want in zip(self.inputs, self.sha256):
            if want and not isinstance(inp, Adapter):
                got = input_sha256(inp)
                if got is not None and got != want:
                    raise MergeError(f"sha256 {got[:12]}… does not match the recipe's {want[:12]}…", inp)
        if self.base_weights is not None and self.base_weights_sha256:
            got = input_sha256(self.base_weights)
            if got is not None and got != self.base_weights_sha256:
                raise MergeError(f"base weights: sha256 {got[:12]}… does not match the recipe's "
                                 f"{self.base_weights_sha256[:12]}…", self.base_weights)

    def resolved_weights(self) -> list[float]:
        n = len(self.inputs)
        if self.weights is None:
            return [1.0] * n
        w = [float(x) for x in self.weights]
        if len(w) != n:
            raise UsageError(f"{len(w)} weight(s) given for {n} input(s)")
        if not all(math.isfinite(x) for x in w):
            raise UsageError(f"weights must be finite numbers, got {w}")
        return w

    def resolved_layer_weights(self) -> list[tuple[str, list[float]]]:
        """``(pattern, one value per input)`` for every ``--weight`` rule, patterns checked."""
        n = len(self.inputs)
        out = []
        for pattern, value in self.layer_weights:
            compile_pattern(pattern)
            vals = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
            if len(vals) != n:
                raise UsageError(f"--weight {pattern!r}: {len(vals)} value(s) for {n} input(s)")
            out.append((pattern, vals))
        return out

    @property
    def out_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype) or torch.float32

    # ------------------------------------------------------------------ output
    def to_metadata(self, names: Sequence[str], hashes: Sequence[str | None], dialects: Sequence[str | None],
                    strategy_config: dict[str, Any], arch: str | None, to: str | None,
                    version: str, base_weights: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``lora_merge.recipe`` dict a merged file records: a recipe that replays the merge (every
        strategy parameter resolved, weights and dialect filled in)."""
        out = {
            "inputs": [{"path": nm, "sha256": h, "dialect": d} for nm, h, d in zip(names, hashes, dialects)],
            "strategy": self.strategy,
            "params": dict(strategy_config),
            "weights": self.resolved_weights(),
            "layer_weights": [[p, v] for p, v in self.resolved_layer_weights()],
            "rank": self.rank,
            "seed": int(self.seed),
            "dtype": dtype_name(self.out_dtype),
            "to": to,
            "arch": arch,
            "keep_heads_from": self.keep_heads_from,
            "version": version,
        }
        for key in ("full_rank", "allow_mixed_arch"):  # recorded only when set (older recipes replay byte for byte)
            if getattr(self, key):
                out[key] = True
        if base_weights is not None:  # {path, sha256}: only when it changed the result (DoRA inputs)
            out["base_weights"] = dict(base_weights)
        return out


#: every key a recipe file may hold: the recipe's settings, the run options and the version
RECIPE_KEYS = (
    *(f.name for f in dataclasses.fields(Recipe) if f.name not in ("sha256", "base_weights_sha256")),
    *(f.name for f in dataclasses.fields(MergeOptions) if f.name != "progress"),
    "version",
)


# ---------------------------------------------------------------------- file parsing
def _parse_text(path: Path) -> Any:
    try:
        with open_input(path) as fh:
            raw = fh.read()
    except FormatError as exc:
        raise UsageError(str(exc).split(": ", 1)[-1], path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"a recipe file is UTF-8 text; byte {exc.start} is not ({exc.reason})", path) from None
    if _bracket_depth(text) > MAX_RECIPE_DEPTH:  # before any parser: 100,000 brackets took YAML minutes
        raise UsageError("bad recipe: nested too deeply", path)
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"bad TOML recipe: {exc}", path) from None
        except RecursionError:
            raise UsageError("bad recipe: nested too deeply", path) from None
    import yaml  # YAML is a superset of JSON

    try:
        # no recipe needs anchors and aliases, and a few nested ones expand to gigabytes (an "alias bomb"):
        # the event stream is read first, without building anything
        if any(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise UsageError("YAML aliases (*name) are not allowed in a recipe file; write the values out", path)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"bad YAML recipe: {str(exc).splitlines()[0]}", path) from None
    except RecursionError:  # thousands of nested brackets: no recipe looks like that
        raise UsageError("bad recipe: nested too deeply", path) from None


#: how deeply a recipe file's lists/mappings may nest (a real one needs 3)
MAX_RECIPE_DEPTH = 64


def _bracket_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in ``text`` (brackets inside quotes count too: only a bound)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file as a dict of :data:`RECIPE_KEYS` (those present): strategy parameters given at the
    top level move into ``params``; input, output and report paths become relative to the file's folder.
    Unknown keys raise :class:`UsageError`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError("recipe file not found", path)
    data = _parse_text(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError("a recipe must be a mapping of keys to values", path)
    params = data.pop("params", None) or {}
    if not isinstance(params, dict):
        raise UsageError("'params' must be a mapping", path)
    params = dict(params)
    known_params = {p.name for cls in available_strategies().values() for p in cls.params}
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
        out["inputs"] = [_relative_entry(x, base, path) for x in _as_list(out["inputs"], "inputs", path)]
    for k in ("output", "report"):
        if out.get(k) is not None:
            out[k] = str(_rel(out[k], base, k, path))
    if out.get("base_weights") is not None:
        out["base_weights"] = _relative_entry(out["base_weights"], base, path)
    return out


def _as_list(value: Any, key: str, path: Path | None) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise UsageError(f"{key!r} must be a list", path)


def _rel(p: str | os.PathLike, base: Path, key: str = "path", where: Path | None = None) -> Path:
    if not isinstance(p, (str, os.PathLike)):
        raise UsageError(f"{key!r} must be a path (a string), got {type(p).__name__} {p!r}"[:200], where or base)
    p = Path(os.path.expanduser(os.fspath(p)))
    return p if p.is_absolute() else base / p


def _relative_entry(item: Any, base: Path, path: Path) -> Any:
    if isinstance(item, (str, os.PathLike)):
        return str(_rel(item, base))
    if isinstance(item, dict) and "path" in item:
        return {**item, "path": str(_rel(item["path"], base, "path", path))}
    return item  # _input_entry names the problem


def _input_entry(item: Any, path: Path | None) -> dict[str, Any]:
    if isinstance(item, Adapter):
        return {"path": item}
    if isinstance(item, (str, os.PathLike)):
        return {"path": os.fspath(item)}
    if isinstance(item, dict) and "path" in item:
        extra = set(item) - {"path", "sha256", "dialect"}
        if extra:
            raise UsageError(f"unknown key {min(extra)!r} in an input entry (keys: path, sha256)", path)
        if not isinstance(item["path"], (str, os.PathLike)):
            raise UsageError(f"'path' must be a path (a string), got {type(item['path']).__name__}"
                             f" {quoted(item['path'], 60)}", path)
        sha = item.get("sha256")
        if sha is not None and not isinstance(sha, str):
            raise UsageError(f"'sha256' of input {quoted(item['path'], 60)} must be a string of hex digits, got "
                             f"{quoted(sha, 60)}", path)
        return {"path": os.fspath(item["path"]), "sha256": sha}
    raise UsageError(f"bad input entry {quoted(item, 120)}: expected a path or {{path: ..., sha256: ...}}", path)


def _int(value: Any, key: str, path: Path | None) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{key!r} must be an integer, got {value!r}", path)
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key!r} must be an integer, got {value!r}", path) from None
    if not math.isfinite(f) or int(f) != f:
        raise UsageError(f"{key!r} must be an integer, got {value!r}", path)
    return int(f)


def _weights(value: Any, path: Path | None) -> tuple[float, ...]:
    items = value.split(",") if isinstance(value, str) else _as_list(value, "weights", path)
    try:
        return tuple(float(x) for x in items if not (isinstance(x, str) and not x.strip()))
    except (TypeError, ValueError):
        raise UsageError(f"'weights' must be numbers, got {value!r}", path) from None


def _layer_weights(value: Any, path: Path | None) -> tuple[tuple[str, Any], ...]:
    items = list(value.items()) if isinstance(value, dict) else _as_list(value, "layer_weights", path)
    out = []
    for it in items:
        if isinstance(it, str):
            pat, val = parse_layer_weight(it)
        elif isinstance(it, (list, tuple)) and len(it) == 2:
            pat, val = it
        else:
            raise UsageError(f"bad layer weight {it!r}: expected 'PATTERN=W' or [PATTERN, W]", path)
        try:
            val = tuple(float(v) for v in val) if isinstance(val, (list, tuple)) else float(val)
        except (TypeError, ValueError):
            raise UsageError(f"layer weight for {pat!r} must be a number or a list", path) from None
        out.append((str(pat), val))
    return tuple(out)


def _fill_recorded_defaults(data: dict[str, Any]) -> None:
    """A recipe recorded before a strategy gained a parameter replays with the behaviour it had then: the
    strategy's ``recorded_defaults`` fill the parameters the recipe lacks (e.g. ``strength: free`` for a
    ziplora file merged before ``--strength`` existed)."""
    strategy, params = data.get("strategy"), data.get("params")
    cls = available_strategies().get(strategy) if isinstance(strategy, str) else None
    if cls is None or not isinstance(params, dict):
        return
    for key, value in getattr(cls, "recorded_defaults", {}).items():
        params.setdefault(key, value)
