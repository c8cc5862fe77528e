"""``merge --base-weights``: with the base model's weights a DoRA input becomes an exact dense update
(its magnitude re-applied to ``W + B·A``), the file's sha256 is recorded in the recipe and checked on
replay; without DoRA inputs nothing is recorded.  Without the base weights a DoRA merge is one error
naming the option."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import cli_result as cli
from conftest import save_tensors as _file

import lora_merge
from lora_merge.engine import Recipe, run_merge


def _dora_pair(tmp_path):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(8, 8, generator=g)
    base = _file(tmp_path / "base.safetensors", {"double_blocks.0.img_attn.proj.weight": w})
    files, want = [], []
    for i in range(2):
        a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
        mag = torch.rand(1, 8, generator=g) + 0.5
        key = "lora_unet_double_blocks_0_img_attn_proj"
        files.append(_file(tmp_path / f"dora{i}.safetensors", {
            f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(2.0),
            f"{key}.dora_scale": mag}))
        new = w + b @ a
        want.append(mag * new / new.norm(dim=0, keepdim=True) - w)
    return base, files, want


def test_merge_base_weights_makes_dora_inputs_exact_and_records_its_sha256(tmp_path, capsys):
    base, (d0, d1), (w0, w1) = _dora_pair(tmp_path)
    out = tmp_path / "m.safetensors"
    code, _, err = cli(["merge", d0, d1, "-o", out, "--weights", "0.6,0.3"], capsys)
    line = err.strip().splitlines()[-1]
    assert code != 0 and not out.exists() and "DoRA" in line and "--base-weights" in line
    code, _, err = cli(["merge", d0, d1, "-o", out, "--weights", "0.6,0.3", "--rank", "8",
                        "--base-weights", base], capsys)
    assert code == 0, err
    ad = lora_merge.load(out)
    torch.testing.assert_close(ad["transformer.double_blocks.0.img_attn.proj"].delta(), 0.6 * w0 + 0.3 * w1,
                               rtol=1e-4, atol=1e-5)
    rec = json.loads(ad.metadata["lora_merge.recipe"])
    assert rec["base_weights"] == {"path": "base.safetensors",
                                   "sha256": hashlib.sha256(base.read_bytes()).hexdigest()}
    # the Python API takes it too, and a recorded base_weights is checked on replay
    res = lora_merge.merge([d0, d1], weights=[0.6, 0.3], rank=8, base_weights=base)
    torch.testing.assert_close(res.adapter["transformer.double_blocks.0.img_attn.proj"].delta(),
                               0.6 * w0 + 0.3 * w1, rtol=1e-4, atol=1e-5)
    recipe = Recipe.from_dict({**rec, "inputs": [d0, d1],
                                          "base_weights": {"path": str(base), "sha256": "0" * 64}})
    with pytest.raises(lora_merge.errors.MergeError, match="base weights: sha256"):
        run_merge(recipe)


def test_base_weights_is_not_recorded_when_no_input_is_dora(tmp_path):
    base, _, _ = _dora_pair(tmp_path)
    g = torch.Generator().manual_seed(1)
    key = "lora_unet_double_blocks_0_img_attn_proj"
    p = _file(tmp_path / "plain.safetensors", {f"{key}.lora_down.weight": torch.randn(2, 8, generator=g),
                                               f"{key}.lora_up.weight": torch.randn(8, 2, generator=g)})
    res = lora_merge.merge([p, p], base_weights=base)
    assert "base_weights" not in res.report["recipe"]
