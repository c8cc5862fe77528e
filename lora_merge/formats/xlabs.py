"""XLabs-AI FLUX.1 LoRAs (read only): ``double_blocks.N.processor.qkv_lora1.down.weight`` / ``.up.weight``
(image qkv), ``proj_lora1`` (image attention proj), ``qkv_lora2`` / ``proj_lora2`` (text), and
``single_blocks.N.processor.qkv_lora`` (the q/k/v rows of ``linear1``); an optional ``diffusion_model.``
prefix.  No alpha: scale 1 (XLabs' ``lora_weight`` is a strength chosen at run time, 1 by default).

They map onto the native (fused) Flux modules exactly: a ``single_blocks`` qkv LoRA is ``linear1`` with zero
rows for its MLP part.  XLabs' single-block ``proj_lora`` is added to the *output* of ``linear2``
(``y + P·y``), which is not a weight update of any one layer without the base weights: it is refused.
"""
from __future__ import annotations

import re

import torch

from ..adapter import Adapter, TensorRef
from ..errors import FormatError, UsageError
from .common import make_module
from .layout import DerivedRef
from .registry import FileDialect

_KEY = re.compile(r"^(?:diffusion_model\.)?(?P<blk>double_blocks|single_blocks)\.(?P<i>\d+)\.processor\."
                  r"(?P<p>qkv_lora1|proj_lora1|qkv_lora2|proj_lora2|qkv_lora|proj_lora)\.(?P<r>down|up)\.weight$")
_DOUBLE = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
           "proj_lora2": "txt_attn.proj"}


def claims(key: str) -> bool:
    return _KEY.match(key) is not None


def read(refs: dict[str, TensorRef], metadata: dict[str, str], path) -> Adapter:
    groups: dict[tuple[str, str, str], dict[str, tuple[str, TensorRef]]] = {}
    unparsed = []
    for key, ref in refs.items():
        m = _KEY.match(key)
        if m is None:
            unparsed.append(key)
            continue
        groups.setdefault((m.group("blk"), m.group("i"), m.group("p")), {})[m.group("r")] = (key, ref)
    ad = Adapter(dialect="xlabs", dialect_variant="xlabs-flux", metadata=dict(metadata))
    for (blk, i, part), slot in groups.items():
        src = (slot.get("down") or slot.get("up"))[0].rsplit(".", 2)[0]  # type: ignore[index]
        down, up = slot.get("down", (None, None))[1], slot.get("up", (None, None))[1]
        if blk == "double_blocks" and part in _DOUBLE:
            name = f"transformer.double_blocks.{i}.{_DOUBLE[part]}"
            ad.modules[name] = make_module(name, down, up, path, src, None)
        elif blk == "single_blocks" and part == "qkv_lora":
            mod = make_module(f"transformer.single_blocks.{i}.linear1", down, up, path, src, None)
            h = int(down.shape[1])  # type: ignore[union-attr]
            if mod.out_features != 3 * h:
                raise FormatError(f"module {src}: up matrix has {mod.out_features} rows, expected 3·{h}", path)
            r = mod.rank
            padded = DerivedRef((7 * h, r), up.dtype,  # type: ignore[union-attr]
                                lambda up=up, h=h, r=r: torch.cat([up.load(), up.load().new_zeros(4 * h, r)]), up)
            mod.up = padded
            ad.modules[mod.name] = mod
        else:
            raise FormatError(f"module {src}: XLabs' single-block proj_lora is added to the output of linear2 "
                              "(y + P·y), not a weight update; lora-merge cannot read it exactly", path)
    ad.unparsed_keys = sorted(unparsed)
    return ad


def _write(adapter, dtype, metadata):
    raise UsageError("the xlabs dialect is read only; write kohya, comfyui, diffusers or peft")


class _XLabs(FileDialect):
    writable = False


#: XLabs-AI FLUX.1 LoRA files (read only).
DIALECT = _XLabs(name="xlabs", label="XLabs", precedence=0, claimer=claims, reader=read, writer=_write)
