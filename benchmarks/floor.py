"""The least any merge tool must do with two kohya LoRA files: load both, concatenate the factors (each
file's alpha/rank folded into its down matrix), save.  The floor the merge benchmarks divide by."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file


def load_concat_save(a, b, out, alpha_dtype: torch.dtype | None = None) -> None:
    """Write the exact sum of kohya files ``a`` and ``b`` to ``out``; the new alpha (= rank, scale 1) is
    stored as ``alpha_dtype`` (default: the down matrix's dtype)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    res = {}
    for key in ta:
        if not key.endswith(".lora_down.weight"):
            continue
        p = key[: -len(".lora_down.weight")]
        sa = float(ta[p + ".alpha"]) / ta[key].shape[0]
        sb = float(tb[p + ".alpha"]) / tb[key].shape[0]
        down = torch.cat([ta[key] * sa, tb[key] * sb])
        res[key] = down
        res[p + ".lora_up.weight"] = torch.cat([ta[p + ".lora_up.weight"], tb[p + ".lora_up.weight"]], 1)
        res[p + ".alpha"] = torch.tensor(float(down.shape[0]), dtype=alpha_dtype or down.dtype)
    save_file(res, str(out))
