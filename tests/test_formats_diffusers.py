"""The diffusers dialects: attention processors, LoRACompatible ``.lora.down``/``lora_linear_layer``,
current ``lora_A``/``lora_B``; prefixes; ``network_alphas``-style ``.alpha`` keys;
``lora_adapter_metadata``."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import lora_merge
from lora_merge.formats import diffusers as fd


@pytest.mark.parametrize("key,module,role,variant", [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "up", "diffusers-attn-processor"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight",
     "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "down", "diffusers-attn-processor"),
    ("text_encoder.text_model.encoder.layers.3.self_attn.to_out_lora.down.weight",
     "text_encoder.text_model.encoder.layers.3.self_attn.out_proj", "down", "diffusers-attn-processor"),
    ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight",
     "text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "up", "diffusers-lora-compatible"),
    ("unet.up_blocks.1.attentions.2.proj_out.lora.down.weight", "unet.up_blocks.1.attentions.2.proj_out",
     "down", "diffusers-lora-compatible"),
    ("unet.up_blocks.1.resnets.0.conv1.lora_B.weight", "unet.up_blocks.1.resnets.0.conv1", "up",
     "diffusers-peft"),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
     "transformer.single_transformer_blocks.0.attn.to_q", "down", "diffusers-peft"),
    ("up_blocks.0.attentions.0.proj_in.lora_A.default.weight", "unet.up_blocks.0.attentions.0.proj_in",
     "down", "diffusers-peft"),
])
def test_parse_key(key, module, role, variant):
    assert fd.parse_key(key) == (module, role, variant)


def test_network_alpha_keys_and_linear_layer(tmp_path):
    t = {
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": torch.randn(2, 8),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": torch.randn(16, 2),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.alpha": torch.tensor(1.0),
        "unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.randn(4, 8),
        "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": torch.randn(8, 4),
    }
    p = tmp_path / "x.safetensors"
    save_file(t, p)
    ad = lora_merge.load(p)
    assert ad.dialect == "diffusers" and ad.dialect_variant == "diffusers-lora-compatible"
    assert ad["text_encoder.text_model.encoder.layers.0.mlp.fc1"].scale == 0.5
    assert ad["unet.down_blocks.0.attentions.0.proj_in"].scale == 1.0


def test_lora_adapter_metadata_patterns(tmp_path):
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2},
            "unet.rank_pattern": {}, "unet.target_modules": ["to_q", "to_k"],
            "text_encoder.r": 4, "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": True}
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    t = {}
    for m in (f"{base}.attn1.to_q", f"{base}.attn2.to_k", te):
        t[f"{m}.lora_A.weight"] = torch.randn(4, 8)
        t[f"{m}.lora_B.weight"] = torch.randn(8, 4)
    p = tmp_path / "m.safetensors"
    save_file(t, p, metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"})
    ad = lora_merge.load(p)
    assert ad[f"{base}.attn1.to_q"].scale == 2.0
    assert ad[f"{base}.attn2.to_k"].scale == 0.5
    assert ad[te].scale_rule == "rslora" and ad[te].scale == 2.0
    unet_cfg = {k[5:]: v for k, v in meta.items() if k[:5] == "unet."}
    te_cfg = {"r": 4, "lora_alpha": 4, "use_rslora": True}
    assert ad.config == {"lora_adapter_metadata": {"unet": unet_cfg, "text_encoder": te_cfg}}


def test_bad_lora_adapter_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"unet.a.lora_A.weight": torch.randn(2, 4), "unet.a.lora_B.weight": torch.randn(4, 2)}, p,
              metadata={"lora_adapter_metadata": "{oops"})
    with pytest.raises(lora_merge.FormatError, match="lora_adapter_metadata is not valid JSON"):
        lora_merge.load(p)


def test_writer_metadata_reproduces_scales(tmp_path):
    src = lora_merge.load(_make(tmp_path))
    out = lora_merge.save(src, tmp_path / "o.safetensors", to="diffusers")
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 4
    assert list(meta["unet.alpha_pattern"].values()) == [1]


def _make(tmp_path):
    t = {}
    for name, alpha in (("lora_unet_a_to_q", 4.0), ("lora_unet_b_to_k", 1.0), ("lora_unet_c_to_v", None)):
        t[f"{name}.lora_down.weight"] = torch.randn(4, 8)
        t[f"{name}.lora_up.weight"] = torch.randn(8, 4)
        if alpha is not None:
            t[f"{name}.alpha"] = torch.tensor(alpha)
    p = tmp_path / "k.safetensors"
    save_file(t, p)
    return p
