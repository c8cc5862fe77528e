"""Wan 2.x: its original (native) module names and the diffusers ones (``WanTransformer3DModel``), one to
one (no fused modules), so converting is a rename and exact:

* ``blocks.N.self_attn.{q,k,v,o}`` ↔ ``blocks.N.attn1.{to_q,to_k,to_v,to_out.0}``;
* ``blocks.N.cross_attn.{q,k,v,o}`` ↔ ``blocks.N.attn2.{…}``, ``cross_attn.{k_img,v_img}`` (I2V) ↔
  ``attn2.{add_k_proj,add_v_proj}``;
* ``blocks.N.ffn.{0,2}`` ↔ ``blocks.N.ffn.net.{0.proj,2}``;
* ``text_embedding.{0,2}`` / ``time_embedding.{0,2}`` ↔ ``condition_embedder.{text,time}_embedder.linear_{1,2}``,
  ``time_projection.1`` ↔ ``condition_embedder.time_proj``, ``head.head`` ↔ ``proj_out``,
  ``img_emb.proj.{1,3}`` ↔ ``condition_embedder.image_embedder.ff.net.{0.proj,2}``.

ComfyUI files (``diffusion_model.blocks.0.self_attn.q.lora_down.weight``) and musubi-tuner's kohya names
(``lora_unet_blocks_0_self_attn_q``) use the native names; diffusers/PEFT files the diffusers ones.
"""
from __future__ import annotations

import re

from ..adapter import Adapter, LoraModule
from ..errors import FormatError
from ..families.wan import FAMILY
from .layout import Layout

P = "transformer."
_BLOCK = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
          "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
          "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj",
          "cross_attn.v_img": "attn2.add_v_proj", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
_TOP = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
        "text_embedding.2": "condition_embedder.text_embedder.linear_2",
        "time_embedding.0": "condition_embedder.time_embedder.linear_1",
        "time_embedding.2": "condition_embedder.time_embedder.linear_2",
        "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out",
        "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
        "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_RX = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)$")


def _rename(name: str, block: dict[str, str], top: dict[str, str]) -> str | None:
    m = _RX.match(name)
    if m:
        d = block.get(m.group(2))
        return None if d is None else f"{P}blocks.{m.group(1)}.{d}"
    return P + top[name[len(P):]] if name.startswith(P) and name[len(P):] in top else None


def native_to_diffusers(name: str) -> str | None:
    return _rename(name, _BLOCK, _TOP)


def diffusers_to_native(name: str) -> str | None:
    return _rename(name, _BLOCK_BACK, _TOP_BACK)


def _renamed(adapter: Adapter, fn) -> Adapter:
    mods: dict[str, LoraModule] = {}
    for m in adapter:
        new = fn(m.name) or m.name
        if new in mods:
            raise FormatError(f"module {m.source_key or m.name}: {new} is in the file twice", adapter.source)
        mods[new] = (LoraModule(new, m.down, m.up, m.alpha, m.scale_rule, m.source_key, m.bias)
                     if new != m.name else m)
    return Adapter(modules=mods, extra_tensors=dict(adapter.extra_tensors), metadata=dict(adapter.metadata),
                   dialect=adapter.dialect, dialect_variant=adapter.dialect_variant, source=adapter.source,
                   config=adapter.config, unparsed_keys=list(adapter.unparsed_keys))


def which_layout(adapter: Adapter) -> str | None:
    nat = any(native_to_diffusers(n) for n in adapter.modules)
    dif = any(diffusers_to_native(n) for n in adapter.modules)
    return "mixed" if nat and dif else "native" if nat else "diffusers" if dif else None


LAYOUT = Layout(family=FAMILY.name, detect=which_layout, to_native=lambda ad: _renamed(ad, diffusers_to_native),
                to_diffusers=lambda ad: _renamed(ad, native_to_diffusers), describe=FAMILY.layout_notes,
                dialect_layout=FAMILY.dialect_layout)
