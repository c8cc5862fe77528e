"""Oracle tests against the installed diffusers / PEFT (no downloads: models built from configs)."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import lora_merge
from lora_merge.adapter import Adapter, LoraModule
from lora_merge.formats import diffusers as fd
from lora_merge.formats import names

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
accelerate = pytest.importorskip("accelerate")

SD1_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280}
LORA_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def _meta_unet(cfg):
    with accelerate.init_empty_weights():
        return diffusers.UNet2DConditionModel(**cfg)


def _lora_targets(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LORA_TYPES)]


def _diffusers_conversion(kohya_names: list[str], unet_config) -> set[str]:
    """Module names diffusers' own kohya converter produces (parsed back with our diffusers reader)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    sd = {}
    for k in kohya_names:
        sd.update({f"{k}.lora_down.weight": torch.zeros(1), f"{k}.lora_up.weight": torch.zeros(1),
                   f"{k}.alpha": torch.tensor(1.0)})
    if unet_config is not None:
        sd = _maybe_map_sgm_blocks_to_diffusers(sd, unet_config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(sd)
    assert len(alphas) == len(kohya_names)
    out = set()
    for key in converted:
        parsed = fd.parse_key(key)
        assert parsed is not None, key
        out.add(parsed[0])
    return out


@pytest.mark.parametrize("arch,cfg,sgm,min_modules",
                         [("sd1", SD1_UNET, False, 280), ("sdxl", SDXL_UNET, True, 790)])
def test_kohya_unet_names_match_diffusers_conversion(arch, cfg, sgm, min_modules):
    unet = _meta_unet(cfg)
    # every Linear/Conv2d: attention, LoCon convs, embeddings
    truth = {f"unet.{n}" for n in _lora_targets(unet)}
    assert len(truth) >= min_modules
    kohya = {names.canonical_to_kohya(n, sgm=sgm): n for n in truth}
    if sgm:
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in kohya)
        assert "lora_unet_output_blocks_2_2_conv" in kohya and "lora_unet_input_blocks_3_0_op" in kohya
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in kohya
    ours = {names.kohya_to_canonical(k)[0] for k in kohya}
    assert ours == truth
    assert _diffusers_conversion(list(kohya), unet.config) == truth


@pytest.mark.parametrize("prefix,comp,cfg,with_projection", [
    ("lora_te_", "text_encoder", CLIP_L, False),
    ("lora_te1_", "text_encoder", CLIP_L, False),
    ("lora_te2_", "text_encoder_2", CLIP_G, True),
])
def test_kohya_text_encoder_names_match_diffusers_conversion(prefix, comp, cfg, with_projection):
    import transformers

    conf = transformers.CLIPTextConfig(**cfg)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    with accelerate.init_empty_weights():
        te = cls(conf)
    targets = [n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(n.endswith("mlp.fc1") for n in targets)
    kohya = [prefix + n.replace(".", "_") for n in targets]
    truth = {f"{comp}.{n}" for n in targets}
    assert {names.kohya_to_canonical(k)[0] for k in kohya} == truth
    assert _diffusers_conversion(kohya, None) == truth


TINY_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 16, "attention_head_dim": 8, "norm_num_groups": 8,
}


def _tiny_unet_adapter(unet, rslora=False) -> Adapter:
    g = torch.Generator().manual_seed(3)
    ad = Adapter(dialect="kohya", metadata={"ss_network_dim": "mixed"})
    rule = "rslora" if rslora else "standard"
    for i, (n, m) in enumerate(unet.named_modules()):
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0", "proj"):
            r = 2 + i % 3
            ad.modules[f"unet.{n}"] = LoraModule.from_tensors(
                f"unet.{n}", torch.randn(r, m.in_features, generator=g),
                torch.randn(m.out_features, r, generator=g), alpha=[1.0, 4.0, 0.5, None][i % 4],
                scale_rule=rule)
        elif isinstance(m, torch.nn.Conv2d) and n.endswith(("resnets.0.conv1", "proj_in")):
            k = m.kernel_size
            ad.modules[f"unet.{n}"] = LoraModule.from_tensors(
                f"unet.{n}", torch.randn(3, m.in_channels, *k, generator=g),
                torch.randn(m.out_channels, 3, 1, 1, generator=g), alpha=5.0, scale_rule=rule)
    return ad


@pytest.mark.parametrize("rslora", [False, True])
def test_written_diffusers_file_loads_into_unet_exactly(tmp_path, caplog, rslora):
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    ad = _tiny_unet_adapter(unet, rslora)
    assert {m.kind for m in ad} == {"linear", "conv", "conv1x1"} and len({m.rank for m in ad}) == 3
    path = lora_merge.save(ad, tmp_path / "lora.safetensors", to="diffusers")

    state_dict, network_alphas, metadata = diffusers.StableDiffusionPipeline.lora_state_dict(
        str(path), return_lora_metadata=True)
    assert network_alphas is None and metadata is not None
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([10])
    ctx = torch.randn(1, 3, 16)
    with torch.no_grad():
        base_out = unet(x, t, ctx).sample
    with caplog.at_level(logging.WARNING):
        unet.load_lora_adapter(state_dict, prefix="unet", metadata=metadata, adapter_name="ours")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage() or "missing" in r.getMessage()]

    with torch.no_grad():
        assert not torch.allclose(unet(x, t, ctx).sample, base_out)
    loaded = {f"unet.{n}": m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert set(loaded) == set(ad.modules)  # no unmatched keys either way
    for name, layer in loaded.items():
        ours = ad[name]
        with torch.no_grad():  # a zero base layer: its output change is the LoRA's alone (no cancellation)
            layer.base_layer.weight.zero_()
        assert layer.scaling["ours"] == pytest.approx(ours.scale, rel=1e-12)
        # the layer's output changes by exactly ΔW applied to the input
        if ours.kind == "linear":
            inp = torch.randn(5, ours.in_features)
            with torch.no_grad():
                change = layer(inp) - layer.base_layer(inp)
            expect = inp @ ours.delta().T
            torch.testing.assert_close(change, expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max()))
        else:
            inp = torch.randn(1, ours.down.shape[1], 6, 6)
            with torch.no_grad():
                change = layer(inp) - layer.base_layer(inp)
                conv = layer.base_layer
                expect = torch.nn.functional.conv2d(inp, ours.delta(flat=False), None, conv.stride,
                                                    conv.padding)
            torch.testing.assert_close(change, expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max()))


def _peft_roundtrip(tmp_path, fixture, keep_layers, model):
    from conftest import shared_fixture
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    src = lora_merge.load(shared_fixture(fixture))
    for name in list(src.modules):
        if not any(f".{i}." in name for i in keep_layers):
            del src.modules[name]
    out = lora_merge.save(src, tmp_path / "adapter", to="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on missing/unexpected adapter keys
        peft_model = PeftModel.from_pretrained(model, str(out))
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
              if isinstance(m, LoraLayer)}
    assert set(layers) == set(src.modules)
    for name, layer in layers.items():
        m = src[name]
        assert torch.equal(layer.lora_A["default"].weight, m.down.load())
        assert torch.equal(layer.lora_B["default"].weight, m.up.load())
        assert layer.scaling["default"] == m.scale
        inp = torch.randn(3, m.in_features)
        with torch.no_grad():
            change = layer(inp) - layer.base_layer(inp)
        torch.testing.assert_close(change, inp @ m.delta().T, rtol=1e-4, atol=1e-4)
    return src, peft_model


def test_written_peft_folder_loads_with_peftmodel_distilbert(tmp_path):
    import transformers

    cfg = transformers.DistilBertConfig(vocab_size=64, dim=768, n_layers=2, n_heads=12, hidden_dim=64,
                                        num_labels=6)
    model = transformers.DistilBertForSequenceClassification(cfg).eval()
    src, pm = _peft_roundtrip(tmp_path, "peft/distilbert_emotion", [0, 1], model)
    head = pm.base_model.model.classifier
    assert torch.equal(head.modules_to_save["default"].weight, src.extra_tensors["classifier.weight"].load())


def test_written_peft_folder_loads_with_peftmodel_gpt2_fan_in_fan_out(tmp_path):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=768, n_layer=2, n_head=12,
                                  n_inner=3072)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _src, pm = _peft_roundtrip(tmp_path, "peft/gpt2_tigrinya", [0, 1], model)
    assert pm.peft_config["default"].fan_in_fan_out is True


def _delta_check(unet, ad, adapter_name):
    from peft.tuners.lora import LoraLayer

    loaded = {f"unet.{n}": m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert set(loaded) == set(ad.modules)
    for name, layer in loaded.items():
        theirs = layer.get_delta_weight(adapter_name)
        ours = ad[name].delta(flat=False)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6 * float(ours.abs().max()))


def test_written_kohya_file_loads_with_diffusers_kohya_converter(tmp_path):
    """diffusers converts our kohya output (alphas via network_alphas) to the same ΔW.

    One alpha for all modules (ranks still mixed): diffusers 0.42 drops *varying* kohya alphas for SD 1.x
    UNets (its alpha_pattern keys keep the ``processor.to_k_lora.down.weight`` suffix and match nothing) —
    see docs/formats.md; our diffusers-dialect output carries mixed alphas exactly (test above)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    ad = _tiny_unet_adapter(unet)
    for m in ad:
        m.alpha = 4.0
    assert len({m.scale for m in ad}) > 1
    path = lora_merge.save(ad, tmp_path / "k.safetensors", to="kohya")
    state_dict, network_alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(path))
    assert len(network_alphas) == len(ad)
    unet.load_lora_adapter(state_dict, prefix="unet", network_alphas=network_alphas, adapter_name="k")
    _delta_check(unet, ad, "k")


def test_reads_file_written_by_diffusers_save_lora_weights(tmp_path):
    """A current-dialect file saved by diffusers itself (alphas in lora_adapter_metadata) reads exactly."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                     rank_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2},
                     alpha_pattern={"to_k": 3}, init_lora_weights=False)
    unet.add_adapter(cfg, adapter_name="d")
    sd = get_peft_model_state_dict(unet, adapter_name="d")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=sd, unet_lora_adapter_metadata=cfg.to_dict(),
        weight_name="d.safetensors")
    ad = lora_merge.load(tmp_path / "d.safetensors")
    assert ad.dialect_variant == "diffusers-peft"
    assert {m.rank for m in ad} == {2, 4} and {m.scale for m in ad} == {2.0, 4.0, 0.75}
    _delta_check(unet, ad, "d")
