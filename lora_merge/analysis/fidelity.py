"""Layer fidelity: how much of each source LoRA's effect a merged update keeps, from the factors alone.

Per layer, under an input model (:mod:`lora_merge.input_models`)::

    content retention = 1 − ‖(ΔW_m − ΔW_c) X_c‖² / ‖ΔW_c X_c‖²
    style retention   = 1 − ‖(ΔW_m − ΔW_s) X_s‖² / ‖ΔW_s X_s‖²

``ΔW_c`` / ``ΔW_s`` are the source LoRAs at strength 1 (``alpha/r · B A``, the user's weight not applied),
so a merge at weights (0.5, 0.5) and one at (1, 1) are judged against the same targets.  1 means the merge
acts on that LoRA's inputs exactly as the LoRA alone; it can be negative.  Everything is computed from
``r × r`` Gram products (never a ``d_out × d_in`` matrix).  ``joint`` = mean over layers of
``min(content, style)``.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..adapter import Adapter
from ..arch import block_of
from ..formats.api import load
from ..input_models import InputModel, gram, resolve_input_model
from ..strategies.base import LayerInput


def _err_energy(up: torch.Tensor, down: torch.Tensor, factor: torch.Tensor | None) -> float:
    """``‖(up·down) L‖²_F`` (``L`` the input factor, None = identity) via ``Σ (upᵀup) ⊙ (down Σ downᵀ)``."""
    up, down = up.double(), down.double()
    return float(((up.T @ up) * gram(down, down, factor)).sum())


def retention(
    merged_up: torch.Tensor,
    merged_down: torch.Tensor,
    content: LayerInput,
    style: LayerInput,
    input_model: str | InputModel = "subspace",
    *,
    module: str = "",
    stats: str | os.PathLike | None = None,
) -> dict[str, float | None]:
    """``{"content": float, "style": float}`` for one layer; ``merged_up @ merged_down`` is the merged ΔW
    (its scale already applied).  A side whose LoRA is absent or zero at this layer is ``None``."""
    model = resolve_input_model(input_model, stats)
    mu, md = merged_up.float(), merged_down.float()
    ac = content.down.float() if content.present else content.down.new_zeros(0, md.shape[1])
    as_ = style.down.float() if style.present else style.down.new_zeros(0, md.shape[1])
    lc, ls = model.factors(module, ac, as_)
    out: dict[str, float | None] = {}
    for key, x, lf in (("content", content, lc), ("style", style, ls)):
        a = ac if key == "content" else as_
        if a.shape[0] == 0 or x.scale == 0:
            out[key] = None
            continue
        b = x.up.float()[:, : a.shape[0]] * x.scale
        lf = None if lf is None else lf.to(torch.float64)
        ref = _err_energy(b, a, lf)
        if ref <= 0:
            out[key] = None
            continue
        err = _err_energy(torch.cat([mu, -b], 1), torch.cat([md, a], 0), lf)
        out[key] = 1.0 - err / ref
    return out


def _layer_input(adapter, name: str, like) -> LayerInput:
    m = adapter.modules.get(name)
    if m is None:
        d_out, d_in = like.out_features, like.in_features
        return LayerInput(torch.zeros(d_out, 0), torch.zeros(0, d_in), 0.0, 1.0, present=False)
    b, a = m.factors(torch.float32)
    return LayerInput(b, a, m.scale, 1.0)


def evaluate(content: Any, style: Any, merged: Any, input_model: str | InputModel = "subspace",
             stats: str | os.PathLike | None = None) -> dict[str, Any]:  # fmt: skip
    """Per-layer retention of a merged adapter against its content and style sources (adapters or paths).

    Returns ``{"input_model", "layers": [{"module", "block", "content", "style", "joint"}], "mean":
    {"content", "style", "joint", "layers"}}``; the means run over layers where both LoRAs are present.
    """
    c, s, m = (x if isinstance(x, Adapter) else load(x) for x in (content, style, merged))
    model = resolve_input_model(input_model, stats)
    rows = []
    names = sorted(set(c.modules) | set(s.modules))
    for name in names:
        like = c.modules.get(name) or s.modules[name]
        mm = m.modules.get(name)
        if mm is not None:
            mb, ma = mm.factors(torch.float32)
            mb = mb * mm.scale
        else:
            mb, ma = torch.zeros(like.out_features, 0), torch.zeros(0, like.in_features)
        r = retention(mb, ma, _layer_input(c, name, like), _layer_input(s, name, like), model, module=name)
        both = r["content"] is not None and r["style"] is not None
        rows.append({"module": name, "block": block_of(name), "content": r["content"], "style": r["style"],
                     "joint": min(r["content"], r["style"]) if both else None})  # fmt: skip
    both_rows = [r for r in rows if r["joint"] is not None]
    k = max(len(both_rows), 1)
    mean = {
        "content": sum(r["content"] for r in both_rows) / k,
        "style": sum(r["style"] for r in both_rows) / k,
        "joint": sum(r["joint"] for r in both_rows) / k,
        "layers": len(both_rows),
    }
    return {"input_model": model.describe(), "layers": rows, "mean": mean}
