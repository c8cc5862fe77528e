"""Broken-layout hints and repair: a broken kohya conversion
(``lora_unet_unet_…_lora_down.weight``, no alpha) gets its keys shown and a hint, and ``convert --repair``
fixes it; keys we do not understand are shown (a couple of examples)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lora_merge as lm
from lora_merge.cli import main
from lora_merge.errors import FormatError, PartialReadWarning

MODS = {"down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
        "up_blocks_1_attentions_0_proj_in": (640, 640)}


def _broken(path, extra=None):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for n, (o, i) in MODS.items():
        sd[f"lora_unet_unet_{n}_lora_down.weight"] = torch.randn(4, i, generator=g)
        sd[f"lora_unet_unet_{n}_lora_up.weight"] = torch.randn(o, 4, generator=g)
    sd.update(extra or {})
    save_file(sd, str(path))
    return sd


def test_broken_kohya_conversion_gets_examples_and_a_hint(tmp_path):
    _broken(tmp_path / "b.safetensors")
    with pytest.raises(FormatError) as exc:
        lm.load(tmp_path / "b.safetensors")
    msg = str(exc.value)
    assert "\n" not in msg and "e.g. lora_unet_unet_" in msg and "--repair" in msg


def test_repair_fixes_it_exactly(tmp_path, capsys):
    sd = _broken(tmp_path / "b.safetensors")
    out = tmp_path / "fixed.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path / "b.safetensors"), str(out), "--repair"])
    assert exc.value.code == 0, capsys.readouterr().err
    ad = lm.load(out)
    assert ad.dialect == "kohya" and len(ad) == 2
    q = ad["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    n = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert q.scale == 1.0  # no alpha: alpha = rank, as the diffusers file it came from
    assert torch.equal(q.down.load(), sd[f"lora_unet_unet_{n}_lora_down.weight"])
    assert torch.equal(q.up.load(), sd[f"lora_unet_unet_{n}_lora_up.weight"])
    assert "unet.up_blocks.1.attentions.0.proj_in" in ad


def test_unparsed_keys_warning_shows_examples(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 8, generator=g),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 2, generator=g),
          "something_else.weight": torch.randn(3, generator=g)}
    save_file(sd, str(tmp_path / "p.safetensors"))
    with pytest.warns(PartialReadWarning, match="something_else.weight"):
        lm.load(tmp_path / "p.safetensors")
