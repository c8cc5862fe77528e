"""Bias deltas: ``<module>.diff_b`` tensors (LyCORIS full modules, kohya/musubi and ComfyUI Flux/Wan files).

A bias delta is added to the layer's bias at the adapter's strength and **without** a LoRA scale: LyCORIS
applies ``b + diff_b · multiplier`` (``lycoris.modules.base``), ComfyUI patches the bias with the same
"diff" rule as a full ``diff`` weight, and diffusers' Wan converter loads ``diff_b`` as PEFT's
``lora_B.bias`` of a module whose scale it folds into the factors.  It lives on its module
(:attr:`LoraModule.bias`): the layout converters slice, rename or stack it with the up matrix, a merge
adds it up as ``Σ w_i · b_i`` (the layer's coefficients, whatever the strategy does with ΔW), and the
kohya and ComfyUI dialects write it back as ``<module>.diff_b``.  diffusers and PEFT files cannot hold it
(their ``lora_B.bias`` is scaled and refused on reading): writing one drops the bias deltas with one
warning that names them.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

import torch

from ..adapter import Adapter, LoraModule, TensorRef
from ..errors import FormatError

__all__ = ["BIAS_DIALECTS", "BIAS_KEY", "attach_bias_deltas", "has_bias", "merged_bias", "split_bias_keys",
           "warn_dropped"]

BIAS_KEY = re.compile(r"^(?P<m>.+)\.diff_b$")
#: dialects that write a module's bias delta (as ``<module>.diff_b``)
BIAS_DIALECTS = frozenset({"kohya", "comfyui"})
_SHOWN = 3


def split_bias_keys(refs: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], dict[str, TensorRef]]:
    """``(other refs, {module key prefix: diff_b ref})``."""
    rest, bias = {}, {}
    for k, v in refs.items():
        m = BIAS_KEY.match(k)
        if m is None:
            rest[k] = v
        else:
            bias[m.group("m")] = v
    return rest, bias


def _owner(prefix: str, adapter: Adapter) -> LoraModule | None:
    short = prefix.removeprefix("base_model.model.")
    for m in adapter:
        if m.source_key in (prefix, short) or m.name in (prefix, short):
            return m
    return None


def attach_bias_deltas(adapter: Adapter, bias: dict[str, TensorRef], path) -> Adapter:
    """Put each ``diff_b`` on the module of the same key prefix; one :class:`FormatError` naming the file
    and the module for a bias delta without a weight update or of the wrong size."""
    for prefix, ref in sorted(bias.items()):
        m = _owner(prefix, adapter)
        if m is None:
            raise FormatError(f"module {prefix}: a bias delta (diff_b) without a weight update for its module; "
                              "lora-merge reads diff_b only next to a LoRA, LyCORIS or diff module", path)
        if len(ref.shape) != 1 or ref.shape[0] != m.out_features:
            raise FormatError(f"module {prefix}: bias delta diff_b has shape {list(ref.shape)}, the module has "
                              f"{m.out_features} outputs", path)
        if not ref.dtype.is_floating_point:
            raise FormatError(f"module {prefix}: bias delta diff_b has non-float dtype {ref.dtype}", path)
        m.bias = ref
    return adapter


def has_bias(adapter: Adapter) -> bool:
    return any(m.bias is not None for m in adapter)


def merged_bias(modules: dict[str, LoraModule], adapters: Sequence[Adapter],
                coeffs: Callable[[str], Sequence[float]]) -> None:
    """Set each merged module's bias delta to ``Σ c_i · b_i`` over the inputs that have one (fp32)."""
    for name, out in modules.items():
        total = None
        for ad, c in zip(adapters, coeffs(name)):
            m = ad.modules.get(name)
            if m is None or m.bias is None:
                continue
            b = m.bias.load(torch.float32).reshape(-1) * float(c)
            total = b if total is None else total + b
        if total is not None:
            out.bias = TensorRef.from_tensor(total)


def warn_dropped(adapter: Adapter, dialect: str, where) -> None:
    """One warning naming the bias deltas a dialect that cannot hold them leaves out."""
    if dialect in BIAS_DIALECTS:
        return
    names = sorted(m.name for m in adapter if m.bias is not None)
    if not names:
        return
    shown = ", ".join(names[:_SHOWN]) + (f", … ({len(names)} modules)" if len(names) > _SHOWN else "")
    warnings.warn(f"{where}: the {dialect} dialect cannot hold bias deltas (diff_b); not written: {shown} "
                  f"(write --to {' or --to '.join(sorted(BIAS_DIALECTS))} to keep them)", UserWarning, stacklevel=3)
