"""DoRA modules, made exact with the base model's weights.

A DoRA module stores a LoRA (B, A, alpha) and a magnitude ``m``; the layer's new weight is
``W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖`` — the norm per output row (PEFT's ``lora_magnitude_vector``,
shape ``(out,)``; LyCORIS ``dora_scale`` of shape ``(out, 1)``) or per input column (LyCORIS/kohya
``dora_scale`` of shape ``(1, in)``, its default).  Its update ``ΔW = W' − W`` depends on ``W``, which
the file does not hold: without the base weights a DoRA file is refused
(:mod:`lora_merge.formats.unsupported`); with them (``load(..., base_weights=FILE)``,
``lora-merge convert --base-weights FILE``) every DoRA module becomes an exact dense module
(:class:`~lora_merge.formats.lycoris.LycorisModule` of type ``"DoRA"``) that ``--rank K`` re-factors.

The base weight of module ``transformer.double_blocks.0.img_attn.qkv`` is looked up in the model file
as ``double_blocks.0.img_attn.qkv.weight``, then with the component, ``diffusion_model.`` or
``model.diffusion_model.`` in front (diffusers component files, original checkpoints, ComfyUI/A1111
single files).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule, TensorRef
from ..errors import FormatError
from .layout import DerivedRef
from .lycoris import LycorisModule, _factor_refs
from .safetensors_io import lazy_refs, read_header

__all__ = ["DORA_KEY", "apply_dora", "is_dora_key"]

DORA_KEY = re.compile(r"^(?P<m>.+)\.(?:dora_scale|lora_magnitude_vector(?:\.weight)?)$")


def is_dora_key(key: str) -> bool:
    return DORA_KEY.match(key) is not None


def _base_key(name: str, base: dict[str, TensorRef]) -> str | None:
    _comp, _, rel = name.partition(".")
    for cand in (f"{rel}.weight", f"{name}.weight", f"diffusion_model.{rel}.weight",
                 f"model.diffusion_model.{rel}.weight"):
        if cand in base:
            return cand
    return None


def _owner(prefix: str, adapter: Adapter) -> LoraModule | None:
    short = prefix.removeprefix("base_model.model.")
    for m in adapter:
        src = m.source_key or ""
        if src == prefix or src.startswith(prefix + ".") or m.name == short or m.name == prefix:
            return m
    return None


def _dora_delta(m: LoraModule, mag: torch.Tensor, w: torch.Tensor, path=None) -> torch.Tensor:
    w = w.float().reshape(w.shape[0], -1)
    new = w + m.delta()
    mag = mag.float()
    if mag.dim() == 2 and mag.shape[0] == 1 and mag.shape[1] == w.shape[1]:  # (1, in): per input column
        norm, what = new.norm(dim=0, keepdim=True), "column"
    else:  # (out,) or (out, 1): per output row
        mag = mag.reshape(-1, 1)
        norm, what = new.norm(dim=1, keepdim=True), "row"
    zero = (norm == 0).nonzero()
    if zero.numel():  # W' = m·(W+ΔW)/‖W+ΔW‖ has no direction there: the file does not fit these base weights
        i = int(zero[0, 1 if what == "column" else 0])
        raise FormatError(f"module {m.source_key or m.name}: ‖W + ΔW‖ is 0 in {what} {i} ({zero.shape[0]} in all), "
                          "so DoRA's W' = m·(W+ΔW)/‖W+ΔW‖ is undefined; are these the base weights it was trained "
                          "on?", path)
    return mag * (new / norm) - w


def apply_dora(adapter: Adapter, refs: dict[str, TensorRef], base_weights: str | Path, path) -> Adapter:
    """Replace every module that has a DoRA magnitude in ``refs`` by its exact dense update, using the base
    weights in the model safetensors ``base_weights``; the magnitude keys leave ``unparsed_keys``."""
    dora = {k: DORA_KEY.match(k).group("m") for k in refs if is_dora_key(k)}  # type: ignore[union-attr]
    if not dora:
        return adapter
    base = lazy_refs(read_header(base_weights))
    for key, prefix in dora.items():
        m = _owner(prefix, adapter)
        if m is None:
            raise FormatError(f"module {prefix}: a DoRA magnitude ({key}) without its LoRA factors", path)
        bkey = _base_key(m.name, base)
        if bkey is None:
            raise FormatError(f"module {m.source_key or m.name}: no base weight for it in {base_weights} "
                              f"(looked for {m.name.partition('.')[2]}.weight and prefixed forms)", path)
        w_ref, mag_ref = base[bkey], refs[key]
        d_out, d_in = m.out_features, m.in_features
        if tuple(w_ref.shape[:1]) != (d_out,) or w_ref.numel != d_out * d_in:
            raise FormatError(f"module {m.source_key or m.name}: base weight {bkey} is {list(w_ref.shape)}, the "
                              f"LoRA's weight is {list(m.weight_shape)}", path)
        if mag_ref.numel not in (d_out, d_in):
            raise FormatError(f"module {m.source_key or m.name}: DoRA magnitude {key} has shape "
                              f"{list(mag_ref.shape)}, expected {d_out} or {d_in} values", path)
        lora = m

        def delta(lora=lora, mag_ref=mag_ref, w_ref=w_ref):
            return _dora_delta(lora, mag_ref.load(), w_ref.load(), path).reshape(lora.weight_shape)

        full = DerivedRef(m.weight_shape, torch.float32, delta, m.down)
        dm = LycorisModule(name=m.name, down=None, up=None, alpha=None, source_key=m.source_key,  # type: ignore
                           lycoris_type="DoRA", lycoris_rank=m.rank, parts={"diff": full}, gamma=1.0,
                           shape_of_weight=tuple(m.weight_shape))
        dm.down, dm.up = _factor_refs(dm)
        dm.alpha = float(dm.rank)
        adapter.modules[m.name] = dm
    adapter.unparsed_keys = [k for k in adapter.unparsed_keys if k not in dora]
    return adapter
