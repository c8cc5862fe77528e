"""PEFT folders of diffusion LoRAs attach with PEFT: a UNet LoRA is written with
names relative to the UNet, so ``PeftModel.from_pretrained(unet, folder)`` on a tiny UNet built from a
config attaches every module at our scale; reading the folder back gives the canonical ``unet.`` names."""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 16, "attention_head_dim": 8, "norm_num_groups": 8,
}


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**TINY_UNET).eval()


def _adapter(unet):
    g = torch.Generator().manual_seed(3)
    ad = Adapter(dialect="kohya")
    for i, (n, m) in enumerate(unet.named_modules()):
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0", "proj"):
            r = 2 + i % 3
            ad.modules[f"unet.{n}"] = LoraModule.from_tensors(
                f"unet.{n}", torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g),
                alpha=[1.0, 4.0, 0.5, None][i % 4])
        elif isinstance(m, torch.nn.Conv2d) and n.endswith(("resnets.0.conv1", "proj_in")):
            ad.modules[f"unet.{n}"] = LoraModule.from_tensors(
                f"unet.{n}", torch.randn(3, m.in_channels, *m.kernel_size, generator=g),
                torch.randn(m.out_channels, 3, 1, 1, generator=g), alpha=5.0)
    return ad


def test_unet_lora_peft_folder_attaches_with_peftmodel(tmp_path):
    from peft.tuners.lora import LoraLayer

    unet = _unet()
    ad = _adapter(unet)
    folder = lm.save(ad, tmp_path / "unet_peft", to="peft")
    back = lm.load(folder)
    assert set(back.modules) == set(ad.modules)  # canonical names restored
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on missing/unexpected adapter keys
        model = peft.PeftModel.from_pretrained(unet, str(folder))
    layers = {"unet." + n.removeprefix("base_model.model."): m for n, m in model.named_modules()
              if isinstance(m, LoraLayer)}
    assert set(layers) == set(ad.modules)
    for name, layer in layers.items():
        theirs = layer.get_delta_weight("default")
        ours = ad[name].delta(flat=False)
        torch.testing.assert_close(theirs, ours.reshape(theirs.shape), rtol=1e-5, atol=1e-6 * float(ours.abs().max()))


def test_peft_folder_saved_from_a_unet_reads_with_unet_names(tmp_path):
    unet = _unet()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    model = peft.get_peft_model(unet, cfg)
    model.save_pretrained(str(tmp_path / "p"))
    ad = lm.load(tmp_path / "p")
    assert ad.modules and all(n.startswith(("unet.down_blocks.", "unet.up_blocks.", "unet.mid_block."))
                              for n in ad.modules)
    assert {m.scale for m in ad} == {2.0}
