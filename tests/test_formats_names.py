"""kohya ⇄ canonical names: SGM table, dot restoration, writer choices, LoCon conv modules."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora_merge
from lora_merge.adapter import Adapter, LoraModule
from lora_merge.formats import names

# the SGM ↔ diffusers table of docs/formats.md, row by row
SGM_TABLE = [
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_q",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("input_blocks.5.1.proj_in", "down_blocks.1.attentions.1.proj_in"),
    ("input_blocks.7.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
    ("input_blocks.8.1.transformer_blocks.9.ff.net.2",
     "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2"),
    ("middle_block.1.transformer_blocks.0.attn2.to_out.0",
     "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    ("output_blocks.0.1.proj_in", "up_blocks.0.attentions.0.proj_in"),
    ("output_blocks.2.1.proj_in", "up_blocks.0.attentions.2.proj_in"),
    ("output_blocks.3.1.proj_out", "up_blocks.1.attentions.0.proj_out"),
    ("output_blocks.5.1.proj_out", "up_blocks.1.attentions.2.proj_out"),
    ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks.2.0.out_layers.3", "down_blocks.0.resnets.1.conv2"),
    ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks.8.0.emb_layers.1", "down_blocks.2.resnets.1.time_emb_proj"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.6.0.op", "down_blocks.1.downsamplers.0.conv"),
    ("middle_block.0.in_layers.2", "mid_block.resnets.0.conv1"),
    ("middle_block.2.out_layers.3", "mid_block.resnets.1.conv2"),
    ("output_blocks.0.0.skip_connection", "up_blocks.0.resnets.0.conv_shortcut"),
    ("output_blocks.7.0.in_layers.2", "up_blocks.2.resnets.1.conv1"),
    ("output_blocks.8.0.emb_layers.1", "up_blocks.2.resnets.2.time_emb_proj"),
    ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.2", "conv_out"),
]


@pytest.mark.parametrize("sgm,diff", SGM_TABLE)
def test_sgm_table(sgm, diff):
    assert names.sgm_to_diffusers(sgm) == diff
    assert names.diffusers_to_sgm(diff) == sgm
    flat = "lora_unet_" + sgm.replace(".", "_")
    assert names.kohya_to_canonical(flat) == (f"unet.{diff}", True)
    assert names.canonical_to_kohya(f"unet.{diff}", sgm=True) == flat


@pytest.mark.parametrize("kohya,canonical", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
     "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"),
    ("lora_unet_mid_block_attentions_0_proj_in", "unet.mid_block.attentions.0.proj_in"),
    ("lora_unet_down_blocks_1_resnets_0_time_emb_proj", "unet.down_blocks.1.resnets.0.time_emb_proj"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "unet.up_blocks.0.upsamplers.0.conv"),
    ("lora_unet_time_embedding_linear_1", "unet.time_embedding.linear_1"),
    ("lora_te_text_model_encoder_layers_11_self_attn_out_proj",
     "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
    ("lora_te2_text_model_encoder_layers_31_self_attn_k_proj",
     "text_encoder_2.text_model.encoder.layers.31.self_attn.k_proj"),
    ("lora_te2_text_projection", "text_encoder_2.text_projection"),
])
def test_kohya_names(kohya, canonical):
    assert names.kohya_to_canonical(kohya)[0] == canonical
    assert names.canonical_to_kohya(canonical, te1=kohya.startswith("lora_te1_")) == kohya


def test_unknown_prefix_is_not_guessed():
    assert names.kohya_to_canonical("lora_distilbert_transformer_layer_0_attention_q_lin") is None
    assert names.kohya_to_canonical("some_other_thing") is None


def _sdxl_adapter(dialect="diffusers") -> Adapter:
    """All attention projections + a few LoCon convs of an SDXL UNet and both text encoders (tiny tensors)."""
    g = torch.Generator().manual_seed(0)
    ad = Adapter(dialect=dialect)
    mods = []
    for b, (nattn, depth) in {1: (2, 2), 2: (2, 10)}.items():
        for a in range(nattn):
            for t in range(depth):
                for p in ("attn1.to_q", "attn2.to_k", "attn1.to_out.0"):
                    mods.append(f"unet.down_blocks.{b}.attentions.{a}.transformer_blocks.{t}.{p}")
    for b, depth in {0: 10, 1: 2}.items():
        for a in range(3):
            mods.append(f"unet.up_blocks.{b}.attentions.{a}.transformer_blocks.{depth - 1}.attn2.to_v")
    mods += ["unet.mid_block.attentions.0.proj_in", "unet.mid_block.resnets.1.conv2",
             "unet.up_blocks.0.upsamplers.0.conv", "unet.down_blocks.0.downsamplers.0.conv",
             "unet.up_blocks.2.resnets.2.conv_shortcut",
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
             "text_encoder_2.text_model.encoder.layers.0.mlp.fc2"]
    for n in mods:
        conv = n.endswith(("conv2", ".conv", "conv_shortcut"))
        k = 3 if n.endswith(("conv2", ".conv")) else 1
        down = torch.randn((2, 4, k, k) if conv else (2, 4), generator=g)
        up = torch.randn((4, 2, 1, 1) if conv else (4, 2), generator=g)
        ad.modules[n] = LoraModule.from_tensors(n, down, up, alpha=1.0)
    return ad


def test_sdxl_kohya_writer_uses_sgm_names_and_te1(tmp_path):
    ad = _sdxl_adapter()
    out = lora_merge.save(ad, tmp_path / "sdxl.safetensors", to="kohya")
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
        md = f.metadata()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_v.alpha" in keys
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in keys
    assert "lora_unet_input_blocks_3_0_op.lora_down.weight" in keys
    assert "lora_unet_middle_block_2_out_layers_3.lora_down.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc2.alpha" in keys
    assert "lora_merge.kohya_names" not in md  # every name is restorable by rule
    back = lora_merge.load(out)
    assert back.dialect_variant == "kohya-sgm"
    assert set(back.modules) == set(ad.modules)
    for n, m in ad.modules.items():
        assert torch.equal(back[n].delta(), m.delta())
    assert back["unet.up_blocks.0.upsamplers.0.conv"].kind == "conv"
    assert back["unet.up_blocks.2.resnets.2.conv_shortcut"].kind == "conv1x1"
    # SGM in, SGM out; written again as diffusers-named kohya only if the input was
    again = lora_merge.save(back, tmp_path / "again.safetensors")
    assert lora_merge.load(again).dialect_variant == "kohya-sgm"


def test_sd1_kohya_writer_uses_diffusers_block_names(tmp_path):
    ad = Adapter(dialect="diffusers")
    n = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    ad.modules[n] = LoraModule.from_tensors(n, torch.randn(4, 768), torch.randn(320, 4))
    out = lora_merge.save(ad, tmp_path / "sd1.safetensors", to="kohya")
    with safe_open(out, "pt") as f:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in set(f.keys())
    assert lora_merge.load(out).dialect_variant == "kohya-diffusers-names"


def test_kohya_locon_conv_read(tmp_path):
    t = {
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.randn(4, 320, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.randn(320, 4, 1, 1),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(2.0, dtype=torch.float16),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 320, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 4, 1, 1),
    }
    p = tmp_path / "locon.safetensors"
    save_file(t, p)
    ad = lora_merge.load(p)
    conv = ad["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.kind == "conv" and conv.weight_shape == (320, 320, 3, 3) and conv.scale == 0.5
    assert ad["unet.down_blocks.0.attentions.0.proj_in"].kind == "conv1x1"
    assert ad["unet.down_blocks.0.attentions.0.proj_in"].alpha is None  # no alpha key: alpha = r


def test_non_sd_modules_in_kohya_keep_their_names(tmp_path):
    ad = Adapter(dialect="peft")
    n = "distilbert.transformer.layer.0.attention.q_lin"
    ad.modules[n] = LoraModule.from_tensors(n, torch.randn(2, 8), torch.randn(8, 2), alpha=16.0)
    out = lora_merge.save(ad, tmp_path / "k.safetensors", to="kohya")
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["lora_merge.kohya_names"]) == {
            "lora_distilbert_transformer_layer_0_attention_q_lin": n}
    assert list(lora_merge.load(out).modules) == [n]
