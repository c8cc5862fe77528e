"""ComfyUI / original-model dialect of DiT LoRAs: ``diffusion_model.<native path>.lora_up.weight``,
``.lora_down.weight`` and a 0-d ``.alpha`` (``lora_A``/``lora_B`` and ``lora.up``/``lora.down`` are read
too), e.g.
``diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight`` (Flux),
``diffusion_model.joint_blocks.0.x_block.attn.qkv…`` (SD3) or
``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (Wan).  CLIP-L text-encoder modules are
``text_encoders.clip_l.transformer.<path>`` (``clip_g`` for SDXL's second, ``t5xxl`` for SD3's T5); an SD UNet is
``diffusion_model.<SGM path>`` (``input_blocks.1.1…``, the keys of the original checkpoint).  Module names are canonical ``transformer.<native path>``
(and ``text_encoder.<path>``); the writer puts DiT families in their native layout first
(:mod:`lora_merge.formats.layout`).
"""
from __future__ import annotations

import re

import torch

from ..adapter import Adapter, TensorRef
from ..errors import FormatError
from . import names
from .common import carried_metadata, cast, make_module, read_scalar, standard_alpha
from .registry import FileDialect, Written

PREFIXES = {"diffusion_model.": "transformer.", "text_encoders.clip_l.transformer.": "text_encoder.",
            "text_encoders.clip_g.transformer.": "text_encoder_2.",
            "text_encoders.t5xxl.transformer.": "text_encoder_3."}
_BACK = {v: k for k, v in PREFIXES.items()}
_KEY = re.compile(r"^(?P<m>.+)\.(?:(?P<r>lora_up|lora_down|lora_A|lora_B|lora\.up|lora\.down)\.weight|(?P<a>alpha))$")
_ROLE = {"lora_up": "up", "lora_B": "up", "lora.up": "up", "lora_down": "down", "lora_A": "down", "lora.down": "down"}


def _parse(key: str) -> tuple[str, str] | None:
    for pre, comp in PREFIXES.items():
        if key.startswith(pre):
            m = _KEY.match(key[len(pre):])
            if m is None:
                return None
            path = m.group("m")
            if comp == "transformer." and names.is_sgm(path):  # an SD UNet in Stability's layout
                mapped = names.sgm_to_diffusers(path)
                if mapped is None:
                    return None
                comp, path = "unet.", mapped
            return comp + path, "alpha" if m.group("a") else _ROLE[m.group("r")]
    return None


def claims(key: str) -> bool:
    return _parse(key) is not None


def read(refs: dict[str, TensorRef], metadata: dict[str, str], path) -> Adapter:
    groups: dict[str, dict[str, tuple[str, TensorRef]]] = {}
    unparsed: list[str] = []
    for key, ref in refs.items():
        p = _parse(key)
        if p is None:
            unparsed.append(key)
            continue
        slot = groups.setdefault(p[0], {})
        if p[1] in slot:
            raise FormatError(f"module {p[0]}: two {p[1]} tensors ({slot[p[1]][0]}, {key})", path)
        slot[p[1]] = (key, ref)
    ad = Adapter(dialect="comfyui", metadata=dict(metadata), dialect_variant="comfyui")
    for name, parts in groups.items():
        if set(parts) == {"alpha"}:
            unparsed.append(parts["alpha"][0])
            continue
        src = (parts.get("down") or parts.get("up"))[0].rsplit(".", 2)[0].removesuffix(".lora")  # type: ignore[index]
        alpha = read_scalar(parts["alpha"][1], path, parts["alpha"][0]) if "alpha" in parts else None
        ad.modules[name] = make_module(name, parts.get("down", (None, None))[1], parts.get("up", (None, None))[1],
                                       path, src, alpha)
    ad.unparsed_keys = sorted(unparsed)
    return ad


def comfy_name(canonical: str, up_attn: frozenset[int] = frozenset({0, 1})) -> str | None:
    comp, _, rest = canonical.partition(".")
    if comp == "unet":
        sgm = names.diffusers_to_sgm(rest, up_attn)
        return None if sgm is None else "diffusion_model." + sgm
    pre = _BACK.get(comp + ".")
    return None if pre is None or not rest else pre + rest


def write(adapter: Adapter, dtype: torch.dtype | None, metadata: dict[str, str]) -> Written:
    tensors: dict[str, torch.Tensor] = {}
    up_attn = frozenset(int(n.split(".")[2]) for n in adapter.modules
                        if n.startswith("unet.up_blocks.") and ".attentions." in n) or frozenset({0, 1})
    for name, m in adapter.modules.items():
        base = comfy_name(name, up_attn)
        if base is None or _parse(base + ".alpha") != (name, "alpha"):
            raise FormatError(f"module {name} has no ComfyUI name (the comfyui dialect holds diffusion "
                              "models: DiT transformers, SD UNets, CLIP text encoders)", adapter.display_name)
        tensors[f"{base}.lora_down.weight"] = cast(m.down.load(), dtype)
        tensors[f"{base}.lora_up.weight"] = cast(m.up.load(), dtype)
        a = standard_alpha(m)
        t = torch.tensor(a, dtype=torch.float32)
        tensors[f"{base}.alpha"] = t if float(t) == a else torch.tensor(a, dtype=torch.float64)
        if m.bias is not None:  # a bias delta (formats/bias.py)
            tensors[f"{base}.diff_b"] = cast(m.bias.load(), dtype)
    return Written(tensors, carried_metadata(adapter, metadata))


#: ComfyUI's ``diffusion_model.…`` LoRA files (native module names of DiT models).
DIALECT = FileDialect(name="comfyui", label="ComfyUI", precedence=0, claimer=claims, reader=read, writer=write)
