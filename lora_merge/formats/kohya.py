"""kohya / A1111 dialect: ``lora_unet_…``, ``lora_te_…`` (``te1``/``te2``) keys with ``.lora_down.weight``,
``.lora_up.weight`` and a 0-d ``.alpha`` per module."""
from __future__ import annotations

import json
import warnings

import torch

from .. import arch
from ..adapter import Adapter, TensorRef
from ..errors import FormatError
from . import names
from .clients import LoaderWarning, mixed_alpha_note
from .common import carried_metadata, cast, make_module, read_scalar, standard_alpha
from .registry import FileDialect, Written

NAME_MAP_KEY = "lora_merge.kohya_names"
_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def _split(key: str) -> tuple[str, str] | None:
    head, dot, tail = key.partition(".")
    if not dot or tail not in _SUFFIXES:
        return None
    return head, _SUFFIXES[tail]


def claims(key: str) -> bool:
    """A kohya key: ``<name>.lora_down.weight``/``.lora_up.weight``, or an ``.alpha`` of a kohya name."""
    split = _split(key)
    if split is None:
        return False
    return key.startswith((names.UNET_PREFIX, *names.TE_PREFIXES, "lora_")) or split[1] != "alpha"


def read(refs: dict[str, TensorRef], metadata: dict[str, str], path) -> Adapter:
    name_map: dict[str, str] = {}
    if NAME_MAP_KEY in metadata:
        try:
            name_map = dict(json.loads(metadata[NAME_MAP_KEY]))
        except (ValueError, TypeError):
            raise FormatError(f"metadata {NAME_MAP_KEY} is not a JSON object", path) from None
    groups: dict[str, dict[str, tuple[str, TensorRef]]] = {}
    unparsed: list[str] = []
    for key, ref in refs.items():
        sp = _split(key)
        if sp is None:
            unparsed.append(key)
            continue
        groups.setdefault(sp[0], {})[sp[1]] = (key, ref)
    ad = Adapter(dialect="kohya", metadata=dict(metadata), source=None)
    any_sgm = False
    for lora_name, parts in groups.items():
        if lora_name in name_map:
            canon, sgm = str(name_map[lora_name]), False
        else:
            mapped = names.kohya_to_canonical(lora_name)
            if mapped is None:
                unparsed.extend(k for k, _ in parts.values())
                continue
            canon, sgm = mapped
        any_sgm |= sgm
        if set(parts) == {"alpha"}:
            unparsed.append(parts["alpha"][0])
            continue
        alpha = read_scalar(parts["alpha"][1], path, parts["alpha"][0]) if "alpha" in parts else None
        down = parts.get("down", (None, None))[1]
        up = parts.get("up", (None, None))[1]
        if canon in ad.modules:
            raise FormatError(f"module {lora_name}: two kohya names map to the same module {canon}", path)
        ad.modules[canon] = make_module(canon, down, up, path, lora_name, alpha)
    ad.unparsed_keys = sorted(unparsed)
    if any_sgm:
        ad.dialect_variant = "kohya-sgm"
    elif any(n.startswith("unet.") for n in ad.modules):
        ad.dialect_variant = "kohya-diffusers-names"
    else:
        ad.dialect_variant = "kohya"
    return ad


def _uses_sgm(adapter: Adapter) -> bool:
    if adapter.dialect_variant == "kohya-sgm":
        return True
    if adapter.dialect_variant == "kohya-diffusers-names":
        return False
    return arch.guess_arch(adapter) == "sdxl"


def _alpha_tensor(alpha: float) -> torch.Tensor:
    """0-d fp32 alpha (what kohya writes), fp64 when fp32 would round it (loaders call ``.item()``)."""
    t = torch.tensor(alpha, dtype=torch.float32)
    return t if float(t) == alpha else torch.tensor(alpha, dtype=torch.float64)


def write(adapter: Adapter, dtype: torch.dtype | None, metadata: dict[str, str]) -> Written:
    """Tensors and metadata in the kohya dialect (SGM UNet names for SDXL, as kohya's sd-scripts write)."""
    note = mixed_alpha_note(adapter)
    if note:
        warnings.warn(LoaderWarning(f"{adapter.display_name}: written as kohya: {note}"), stacklevel=4)
    sgm = _uses_sgm(adapter)
    te1 = sgm or any(n.startswith("text_encoder_2.") for n in adapter.modules)
    up_attn = frozenset(int(n.split(".")[2]) for n in adapter.modules
                        if n.startswith("unet.up_blocks.") and ".attentions." in n) or frozenset({0, 1})
    tensors: dict[str, torch.Tensor] = {}
    name_map: dict[str, str] = {}
    used: dict[str, str] = {}
    for canon, m in adapter.modules.items():
        kname = names.canonical_to_kohya(canon, sgm=sgm, te1=te1, up_blocks_with_attention=up_attn)
        if kname in used:
            raise FormatError(f"modules {used[kname]} and {canon} would share the kohya name {kname}",
                              adapter.display_name)
        used[kname] = canon
        back = names.kohya_to_canonical(kname)
        if back is None or back[0] != canon:
            name_map[kname] = canon  # rules cannot restore this name: record it
        tensors[f"{kname}.lora_down.weight"] = cast(m.down.load(), dtype)
        tensors[f"{kname}.lora_up.weight"] = cast(m.up.load(), dtype)
        tensors[f"{kname}.alpha"] = _alpha_tensor(standard_alpha(m))
        if m.bias is not None:  # a bias delta, as LyCORIS and ComfyUI name it (formats/bias.py)
            tensors[f"{kname}.diff_b"] = cast(m.bias.load(), dtype)
    md = carried_metadata(adapter, metadata)
    if name_map:
        md[NAME_MAP_KEY] = json.dumps(name_map, sort_keys=True)
    return Written(tensors, md)


#: kohya / A1111 ``.safetensors`` files (what ComfyUI and A1111 load).
DIALECT = FileDialect(name="kohya", label="kohya", precedence=1, claimer=claims, reader=read,
                      writer=write)
