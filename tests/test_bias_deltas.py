"""Bias deltas (``<module>.diff_b``): read onto their module and counted by ``inspect``, merged as
``Σ w_i·b_i`` (no LoRA scale) and written by kohya and comfyui, split and fused back with fused Flux
modules, dropped with one warning by the diffusers writer; a wrong size or a bias without a weight update
is one error."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_result as cli
from conftest import save_tensors as _file

import lora_merge

H = 16


def _flux_kohya_with_bias(path, seed, blocks=range(1), rank=2):
    """kohya Flux LoRA (fused qkv and linear1, h=16) with a diff_b on every module."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for i in blocks:
        shapes[f"lora_unet_double_blocks_{i}_img_attn_qkv"] = (3 * H, H)
        shapes[f"lora_unet_double_blocks_{i}_img_attn_proj"] = (H, H)
        shapes[f"lora_unet_single_blocks_{i}_linear1"] = (7 * H, H)
        shapes[f"lora_unet_single_blocks_{i}_linear2"] = (H, 5 * H)
    sd = {}
    for j, (k, (o, i)) in enumerate(shapes.items()):
        sd[f"{k}.lora_down.weight"] = torch.randn(rank, i, generator=g) / i**0.5
        sd[f"{k}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.1
        sd[f"{k}.alpha"] = torch.tensor(float(rank * (1 + j % 2)))
        sd[f"{k}.diff_b"] = torch.randn(o, generator=g)
    return _file(path, sd), sd


def test_diff_b_is_read_shown_merged_as_a_weighted_sum_and_written_by_kohya(tmp_path, capsys):
    a, sda = _flux_kohya_with_bias(tmp_path / "a.safetensors", 1)
    b, sdb = _flux_kohya_with_bias(tmp_path / "b.safetensors", 2)
    ad = lora_merge.load(a)
    qkv = "transformer.double_blocks.0.img_attn.qkv"
    torch.testing.assert_close(ad[qkv].bias.load(), sda["lora_unet_double_blocks_0_img_attn_qkv.diff_b"])
    code, out, err = cli(["inspect", a, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["bias_deltas"] == 4
    code, out, err = cli(["inspect", a], capsys)
    assert "bias deltas (diff_b): 4 modules" in out
    # merged: Σ w_i·b_i with no LoRA scale (alpha/r differs from 1 here), in kohya and comfyui names
    for to, suffix in (("kohya", "lora_unet_double_blocks_0_img_attn_qkv"),
                       ("comfyui", "diffusion_model.double_blocks.0.img_attn.qkv")):
        res = lora_merge.merge([a, b], tmp_path / f"m_{to}.safetensors", weights=[0.7, 0.4], to=to,
                               layer_weights=["single_blocks=0.5"])
        from safetensors.torch import load_file
        got = load_file(str(res.output))
        for k in ("double_blocks_0_img_attn_qkv", "double_blocks_0_img_attn_proj", "single_blocks_0_linear1"):
            c = 0.5 if "single" in k else 1.0
            want = c * (0.7 * sda[f"lora_unet_{k}.diff_b"] + 0.4 * sdb[f"lora_unet_{k}.diff_b"])
            key = f"lora_unet_{k}.diff_b" if to == "kohya" else \
                "diffusion_model." + k.replace("_blocks_0_", "_blocks.0.").replace("attn_", "attn.") + ".diff_b"
            torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-6)
        assert f"{suffix}.diff_b" in got
        back = lora_merge.load(res.output)  # and reads back onto its module
        assert back[qkv].bias is not None


def test_diff_b_splits_with_fused_modules_and_is_dropped_with_one_warning_by_diffusers(tmp_path):
    a, sda = _flux_kohya_with_bias(tmp_path / "a.safetensors", 3)
    from lora_merge.formats import flux
    split = {m.name: m for m in flux.to_diffusers(lora_merge.load(a))}
    qkv_b = sda["lora_unet_double_blocks_0_img_attn_qkv.diff_b"]
    torch.testing.assert_close(split["transformer.transformer_blocks.0.attn.to_k"].bias.load(), qkv_b[H:2 * H])
    l1 = sda["lora_unet_single_blocks_0_linear1.diff_b"]
    torch.testing.assert_close(split["transformer.single_transformer_blocks.0.proj_mlp"].bias.load(), l1[3 * H:])
    fused = flux.to_native(flux.to_diffusers(lora_merge.load(a)))  # and fuses back exactly
    torch.testing.assert_close(fused["transformer.single_blocks.0.linear1"].bias.load(), l1)
    with pytest.warns(UserWarning, match=r"cannot hold bias deltas \(diff_b\); not written") as rec:
        lora_merge.save(lora_merge.load(a), tmp_path / "d.safetensors", to="diffusers")
    assert sum("diff_b" in str(w.message) for w in rec) == 1


def test_diff_b_of_the_wrong_size_or_without_a_module_is_one_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    k = "lora_unet_double_blocks_0_img_attn_proj"
    base = {f"{k}.lora_down.weight": torch.randn(2, H, generator=g), f"{k}.lora_up.weight": torch.randn(H, 2, generator=g)}
    p = _file(tmp_path / "bad.safetensors", {**base, f"{k}.diff_b": torch.randn(H + 1, generator=g)})
    with pytest.raises(lora_merge.errors.FormatError, match="diff_b has shape"):
        lora_merge.load(p)
    p = _file(tmp_path / "lone.safetensors", {**base, "lora_unet_double_blocks_0_txt_attn_proj.diff_b": torch.zeros(H)})
    with pytest.raises(lora_merge.errors.FormatError, match="without a weight update"):
        lora_merge.load(p)
