"""diffusers dialects, all three generations:

* attention processors: ``…attn1.processor.to_k_lora.down.weight`` (no prefix = UNet)
* LoRACompatible layers: ``unet.….to_k.lora.down.weight``, ``text_encoder.….lora_linear_layer.down.weight``
* current (PEFT-backed): ``unet.….to_k.lora_A.weight`` / ``lora_B.weight``

Alpha: none (alpha = r), per-module ``<module>.alpha`` keys (``network_alphas``), or the
``lora_adapter_metadata`` metadata entry (JSON LoraConfig fields prefixed by component, e.g.
``unet.lora_alpha``) that ``load_lora_weights`` passes to ``LoraConfig``. The writer uses the latter.
"""
from __future__ import annotations

import functools
import json
import re

import torch

from ..adapter import Adapter, TensorRef
from ..errors import FormatError
from .common import (
    PEFT_DEFAULT_ALPHA,
    carried_metadata,
    cast,
    lora_config_for,
    make_module,
    pattern_value,
    read_scalar,
)
from .registry import FileDialect, Written

METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")
#: first path components that mean "UNet" in old files without a prefix
_UNET_HEADS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out",
               "time_embedding", "add_embedding")
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(?P<m>.+?)(?P<proc>\.processor)?\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<r>down|up)\.weight$"),
     "diffusers-attn-processor"),
    (re.compile(r"^(?P<m>.+)\.lora\.(?P<r>down|up)\.weight$"), "diffusers-lora-compatible"),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.(?P<r>down|up)\.weight$"), "diffusers-lora-compatible"),
    (re.compile(r"^(?P<m>.+)\.lora_(?P<r>A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$"), "diffusers-peft"),
]
_ALPHA = re.compile(r"^(?P<m>.+)\.alpha$")


def split_component(name: str) -> tuple[str, str]:
    """``unet.down_blocks.0…`` → ``("unet", "down_blocks.0…")``; other models' names → ``("model", name)``."""
    head, _, rest = name.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return "model", name


def _canonical(path: str) -> str:
    head = path.split(".", 1)[0]
    if head in COMPONENTS:
        return path
    if head in _UNET_HEADS:
        return "unet." + path
    return path


@functools.lru_cache(maxsize=1 << 16)  # detection and reading parse the same keys
def parse_key(key: str) -> tuple[str, str, str] | None:
    """``(canonical module, "down"|"up", variant)`` or None."""
    for rx, variant in _PATTERNS:
        m = rx.match(key)
        if not m:
            continue
        role = {"A": "down", "B": "up"}.get(m.group("r"), m.group("r"))
        mod = _canonical(m.group("m"))
        if "p" in rx.groupindex:
            proj = m.group("p")
            if split_component(mod)[0].startswith("text_encoder"):
                mod = f"{mod}.{_TE_PROJ[proj]}"
            else:
                mod = f"{mod}.to_out.0" if proj == "to_out" else f"{mod}.{proj}"
        return mod, role, variant
    return None


def _component_configs(metadata: dict[str, str], path) -> dict[str, dict]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise FormatError(f"metadata {METADATA_KEY} is not valid JSON", path) from None
    if not isinstance(flat, dict):
        raise FormatError(f"metadata {METADATA_KEY} is not a JSON object", path)
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, dot, field = str(k).partition(".")
        if dot:
            out.setdefault(comp, {})[field] = v
    return out


def read(refs: dict[str, TensorRef], metadata: dict[str, str], path) -> Adapter:
    pairs: dict[str, dict[str, tuple[str, TensorRef]]] = {}
    alphas: dict[str, tuple[str, TensorRef]] = {}
    variants: dict[str, int] = {}
    unparsed: list[str] = []
    for key, ref in refs.items():
        parsed = parse_key(key)
        if parsed is None:
            am = _ALPHA.match(key)
            if am:
                alphas[_canonical(am.group("m"))] = (key, ref)
            else:
                unparsed.append(key)
            continue
        mod, role, variant = parsed
        slot = pairs.setdefault(mod, {})
        if role in slot:
            raise FormatError(f"module {mod}: two {role} weights ({slot[role][0]}, {key})", path)
        slot[role] = (key, ref)
        variants[variant] = variants.get(variant, 0) + 1
    configs = _component_configs(metadata, path)
    ad = Adapter(dialect="diffusers", metadata=dict(metadata))
    for mod, slot in pairs.items():
        src = (slot.get("down") or slot.get("up"))[0]  # type: ignore[index]
        comp, rel = split_component(mod)
        cfg = configs.get(comp)
        rule = "standard"
        if mod in alphas:
            k, r = alphas.pop(mod)
            alpha: float | None = read_scalar(r, path, k)
        elif cfg is not None:
            a = pattern_value(cfg.get("alpha_pattern"), rel)
            alpha = float(a if a is not None else cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA))
            rule = "rslora" if cfg.get("use_rslora") else "standard"
        else:
            alpha = None
        ad.modules[mod] = make_module(mod, slot.get("down", (None, None))[1], slot.get("up", (None, None))[1],
                                      path, src, alpha, rule)
    unparsed.extend(k for k, _ in alphas.values())
    ad.unparsed_keys = sorted(unparsed)
    ad.dialect_variant = max(variants, key=variants.__getitem__) if variants else "diffusers"
    if configs:
        ad.config = {"lora_adapter_metadata": configs}
    return ad


def write(adapter: Adapter, dtype: torch.dtype | None, metadata: dict[str, str]) -> Written:
    """Tensors and metadata in the current diffusers dialect (``lora_A``/``lora_B``), alphas in
    ``lora_adapter_metadata`` so ``load_lora_weights`` reproduces every module's scale."""
    tensors: dict[str, torch.Tensor] = {}
    by_comp: dict[str, list] = {}
    for name, m in adapter.modules.items():
        tensors[f"{name}.lora_A.weight"] = cast(m.down.load(), dtype)
        tensors[f"{name}.lora_B.weight"] = cast(m.up.load(), dtype)
        comp, rel = split_component(name)
        by_comp.setdefault(comp, []).append((rel, m))
    flat: dict[str, object] = {}
    for comp, mods in sorted(by_comp.items()):
        for field, value in lora_config_for(mods).items():
            flat[f"{comp}.{field}"] = value
    md = carried_metadata(adapter, metadata)
    if flat:
        md[METADATA_KEY] = json.dumps(flat, indent=2, sort_keys=True)
    return Written(tensors, md)


#: diffusers ``.safetensors`` files (``pipe.load_lora_weights``); reads all three generations.
DIALECT = FileDialect(name="diffusers", label="diffusers", precedence=2,
                      claimer=lambda key: parse_key(key) is not None, reader=read, writer=write)
