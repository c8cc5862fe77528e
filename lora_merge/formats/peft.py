"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` and full ``modules_to_save`` tensors
(stored by PEFT as ``base_model.model.<head>.weight``; ``…<head>.modules_to_save.<name>.weight`` also read).

Factors are stored ``A: r×in``, ``B: out×r`` even with ``fan_in_fan_out`` (GPT-2 ``Conv1D``); that flag
only says the base weight is transposed, so it is kept in the config and written back.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch

from .. import arch
from ..adapter import Adapter, TensorRef
from ..errors import FormatError, quoted
from ..files import open_input
from .common import PEFT_DEFAULT_ALPHA, carried_metadata, cast, lora_config_for, make_module, pattern_value
from .registry import Located, Written
from .safetensors_io import DuplicateKey, no_duplicate_keys

PREFIX = "base_model.model."
#: safetensors metadata key: the pipeline component (``unet``, ``text_encoder``, …) whose module paths the
#: folder's names are relative to, so that ``PeftModel.from_pretrained(unet, folder)`` attaches it
COMPONENT_KEY = "lora_merge.peft_component"
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
#: the top-level names of a diffusers UNet: a PEFT folder saved from a UNet has only these
_UNET_HEADS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "conv_norm_out",
               "time_embedding.", "add_embedding.")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

_LORA = re.compile(r"^(?P<m>.+)\.lora_(?P<r>A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$")
_SAVED = re.compile(r"^(?P<m>.+)\.modules_to_save\.[A-Za-z0-9_-]+\.(?P<p>[^.]+)$")
_EXTRA = re.compile(r"^(?P<m>.+)\.(?P<p>weight|bias)$")


def read_config(path) -> dict:
    try:
        with open_input(path) as f:  # a regular file only (a FIFO would block)
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise FormatError(f"cannot read {CONFIG_NAME}: {e.strerror or e}", path) from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise FormatError(f"{CONFIG_NAME} is larger than {_MAX_CONFIG_BYTES:,} bytes; not a PEFT config", path)
    try:
        cfg = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except DuplicateKey as e:
        raise FormatError(f"{CONFIG_NAME}: key {quoted(e.args[0])} appears twice", path) from None
    except (ValueError, RecursionError):
        raise FormatError(f"{CONFIG_NAME} is not valid JSON", path) from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{CONFIG_NAME} is not a JSON object", path)
    validate_config(cfg, path)
    return cfg


_MAX_CONFIG_BYTES = 16 * 2**20


def _bad(path, key: str, want: str, value) -> FormatError:
    return FormatError(f"{CONFIG_NAME}: {key!r} must be {want}, got {quoted(value, 60)}", path)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_regex(path, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise FormatError(f"{CONFIG_NAME}: {key} pattern {quoted(pattern, 60)} is not a valid regex "
                          f"({getattr(e, 'msg', e)})", path) from None


def validate_config(cfg: dict, path) -> None:
    """Type-check the ``adapter_config.json`` fields this tool reads; one error naming the key."""
    if "r" in cfg and not (isinstance(cfg["r"], int) and not isinstance(cfg["r"], bool) and cfg["r"] > 0):
        raise _bad(path, "r", "a positive integer", cfg["r"])
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        raise _bad(path, "lora_alpha", "a finite number", cfg["lora_alpha"])
    for key, positive_int in (("alpha_pattern", False), ("rank_pattern", True)):
        pat = cfg.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            raise _bad(path, key, "an object mapping module patterns to numbers", pat)
        for k, v in pat.items():
            _check_regex(path, key, k)
            ok = (isinstance(v, int) and not isinstance(v, bool) and v > 0) if positive_int else _is_number(v)
            if not ok:
                raise _bad(path, f"{key}[{k!r}]", "a positive integer" if positive_int else "a finite number", v)
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        _check_regex(path, "target_modules", tm)
    elif tm is not None and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
        raise _bad(path, "target_modules", "a regex string or a list of module names", tm)
    ms = cfg.get("modules_to_save")
    if ms is not None and not (isinstance(ms, list) and all(isinstance(t, str) for t in ms)):
        raise _bad(path, "modules_to_save", "null or a list of module names", ms)
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "inference_mode"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise _bad(path, key, "true or false", cfg[key])
    if "peft_type" in cfg and not isinstance(cfg["peft_type"], str):
        raise _bad(path, "peft_type", "a string such as \"LORA\"", cfg["peft_type"])


def locate(path: Path) -> Located | None:
    """A PEFT folder (its weights, and its config when it has one), or an ``adapter_model.*`` file with
    an ``adapter_config.json`` beside it; None for any other file."""
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.exists() and (path / PICKLE_WEIGHTS_NAME).exists():
            weights = path / PICKLE_WEIGHTS_NAME
        if not weights.exists():
            raise FormatError(f"folder has no {WEIGHTS_NAME} (not a PEFT adapter folder)", path)
        cfg_path = path / CONFIG_NAME
        config = read_config(cfg_path) if cfg_path.exists() else None
        return Located(weights, config, certain=config is not None)
    sibling = path.parent / CONFIG_NAME
    if path.name in (WEIGHTS_NAME, PICKLE_WEIGHTS_NAME) and sibling.exists():
        return Located(path, read_config(sibling))
    return None


def read(refs: dict[str, TensorRef], metadata: dict[str, str], path, config: dict | None) -> Adapter:
    pairs: dict[str, dict[str, tuple[str, TensorRef]]] = {}
    extras: dict[str, TensorRef] = {}
    unparsed: list[str] = []
    for key, ref in refs.items():
        body = key.removeprefix(PREFIX)
        m = _LORA.match(body)
        if m:
            role = "down" if m.group("r") == "A" else "up"
            slot = pairs.setdefault(m.group("m"), {})
            if role in slot:
                raise FormatError(f"module {m.group('m')}: two lora_{m.group('r')} weights", path)
            slot[role] = (key, ref)
            continue
        if ".lora_" in body:  # lora_embedding_A/B and other LoRA variants we do not model
            unparsed.append(key)
            continue
        s = _SAVED.match(body)
        if s:
            extras[f"{s.group('m')}.{s.group('p')}"] = ref
        elif _EXTRA.match(body):
            extras[body] = ref
        else:
            unparsed.append(key)
    comp = metadata.get(COMPONENT_KEY)
    if comp not in _COMPONENTS:
        comp = "unet" if pairs and all(m.startswith(_UNET_HEADS) for m in pairs) else None
    owner = f"{comp}." if comp else ""
    cfg = config or {}
    if config is None:
        warnings.warn(f"{path}: no {CONFIG_NAME} next to it; assuming alpha = r (scale 1) for every module",
                      UserWarning, stacklevel=4)  # read ← PeftDialect.read ← formats.api.load ← caller
    rule = "rslora" if cfg.get("use_rslora") else "standard"
    ad = Adapter(dialect="peft", metadata=dict(metadata), config=dict(config) if config is not None else None,
                 dialect_variant="peft-folder" if config is not None else "peft-bare")
    for mod, slot in pairs.items():
        alpha: float | None = None
        if config is not None:
            a = pattern_value(cfg.get("alpha_pattern"), mod)
            alpha = float(a if a is not None else cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA))
        src = (slot.get("down") or slot.get("up"))[0]  # type: ignore[index]
        ad.modules[owner + mod] = make_module(owner + mod, slot.get("down", (None, None))[1],
                                              slot.get("up", (None, None))[1], path, src, alpha, rule)
    ad.extra_tensors = extras
    ad.unparsed_keys = sorted(unparsed)
    return ad


def _targets_cover(targets, names: list[str]) -> bool:
    if isinstance(targets, str):
        return all(re.fullmatch(targets, n) for n in names)
    if isinstance(targets, (list, tuple)) and targets:
        return all(any(n == t or n.endswith("." + t) for t in targets) for n in names)
    return False


def _heads(extras: dict[str, TensorRef]) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in extras})


def component_of(adapter: Adapter) -> str | None:
    """``"unet"`` when every module of ``adapter`` is in the UNet (its PEFT folder is written relative to
    the UNet), else None."""
    heads = {n.split(".", 1)[0] for n in adapter.modules}
    # only the UNet so far (tested with PeftModel on a UNet); a text encoder's or a DiT's PEFT folder keeps
    # the pipeline's names (GPT-2's own modules are named transformer.h.N: never a component)
    if heads == {"unet"} and arch.is_diffusion_adapter(adapter):
        return "unet"
    return None


def build_config(adapter: Adapter) -> dict:
    """adapter_config.json content reproducing every module's rank and scale (names relative to the
    component for a one-component diffusion LoRA, see :func:`component_of`)."""
    base = dict(adapter.config) if adapter.config and "peft_type" in adapter.config else {}
    comp = component_of(adapter)
    cut = len(comp) + 1 if comp else 0
    mods = [(n[cut:], m) for n, m in adapter.modules.items()]
    fields = lora_config_for(mods)
    if base and _targets_cover(base.get("target_modules"), [n for n, _ in mods]):
        fields["target_modules"] = base["target_modules"]
    cfg = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "revision": None,
    }
    cfg.update(base)
    cfg.update(fields)
    heads = _heads(adapter.extra_tensors)
    if heads:
        listed = cfg.get("modules_to_save") or []
        if not all(any(h == t or h.endswith("." + t) for t in listed) for h in heads):
            cfg["modules_to_save"] = heads
    return cfg


def write(adapter: Adapter, dtype: torch.dtype | None, metadata: dict[str, str]) -> Written:
    """The folder's tensors and metadata, and its ``adapter_config.json`` as ``Written.files``."""
    tensors: dict[str, torch.Tensor] = {}
    comp = component_of(adapter)  # a UNet LoRA is written relative to the UNet: PeftModel(unet) attaches it
    cut = len(comp) + 1 if comp else 0
    for name, m in adapter.modules.items():
        tensors[f"{PREFIX}{name[cut:]}.lora_A.weight"] = cast(m.down.load(), dtype)
        tensors[f"{PREFIX}{name[cut:]}.lora_B.weight"] = cast(m.up.load(), dtype)
    for name, t in adapter.extra_tensors.items():
        tensors[f"{PREFIX}{name}"] = cast(t.load(), dtype)
    config = json.dumps(build_config(adapter), indent=2, sort_keys=True) + "\n"
    md = carried_metadata(adapter, metadata)
    md.pop(COMPONENT_KEY, None)
    if comp:
        md[COMPONENT_KEY] = comp
    return Written(tensors, md, {CONFIG_NAME: config})


class PeftDialect:
    """PEFT adapter folders (``PeftModel.from_pretrained``); also bare ``adapter_model.safetensors``."""

    name = "peft"
    label = "PEFT"
    precedence = 0  # its prefix is unambiguous; its lora_A/lora_B suffixes would also parse as diffusers
    folder_files = (WEIGHTS_NAME, CONFIG_NAME)
    keeps_extra_tensors = True

    def claims(self, key: str) -> bool:
        return key.startswith(PREFIX)

    def locate(self, path: Path) -> Located | None:
        return locate(path)

    def read(self, refs: dict[str, TensorRef], metadata: dict[str, str], path: Path,
             config: dict | None = None) -> Adapter:
        return read(refs, metadata, path, config)

    def write(self, adapter: Adapter, dtype: torch.dtype | None, metadata: dict[str, str]) -> Written:
        return write(adapter, dtype, metadata)


DIALECT = PeftDialect()
