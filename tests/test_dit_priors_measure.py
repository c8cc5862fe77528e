"""Measured layer priors on DiT pipelines (FLUX.1, SD3/3.5, Z-Image): a tiny pipeline folder of each, built from
configs (no downloads), through ``lora-merge priors measure`` and ``duolora --priors measure``.

A LoRA confined to one transformer block must be found in that block, whichever layout its file has (a
kohya file with fused modules is measured in the diffusers layout), and the priors file must name the
block in both layouts."""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

import lora_merge
from lora_merge.errors import UsageError
from lora_merge.formats.layout import layout_of

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

TOKS = ["<|startoftext|>", "<|endoftext|>", *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]


def _tokenizer(folder: Path):
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TOKS)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8, "tokenizer_class": "CLIPTokenizer"}))


def _clip(cls, hidden, **kw):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=len(TOKS), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8, bos_token_id=0,
                              eos_token_id=1, pad_token_id=1, **kw))


def _t5(d_model):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(TOKS), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2))


def _common(root: Path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                  norm_num_groups=4, sample_size=16, layers_per_block=1, scaling_factor=0.5,
                  shift_factor=0.1).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler().save_pretrained(root / "scheduler")


def make_flux_pipeline(root: Path) -> Path:
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                     pooled_projection_dim=12, axes_dims_rope=(2, 2, 4),
                                     guidance_embeds=True).save_pretrained(root / "transformer")
    _common(root)
    _tokenizer(root / "tokenizer")
    _tokenizer(root / "tokenizer_2")
    _clip(CLIPTextModel, 12).save_pretrained(root / "text_encoder")
    _t5(24).save_pretrained(root / "text_encoder_2")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root


def make_sd3_pipeline(root: Path) -> Path:
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                    caption_projection_dim=16, pooled_projection_dim=24,
                                    pos_embed_max_size=8).save_pretrained(root / "transformer")
    _common(root)
    for i, hidden in (("", 12), ("_2", 16), ("_3", None)):
        _tokenizer(root / f"tokenizer{i}")
        model = _t5(32) if hidden is None else _clip(CLIPTextModelWithProjection, hidden, projection_dim=12)
        model.save_pretrained(root / f"text_encoder{i}")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return root


def make_zimage_pipeline(root: Path) -> Path:
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    diffusers.ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                       cap_feat_dim=16, axes_dims=[4, 6, 6],
                                       axes_lens=[64, 32, 32]).save_pretrained(root / "transformer")
    _common(root)
    _tokenizer(root / "tokenizer")
    cfg = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<|startoftext|>{{ m['content'] }}{% endfor %}"
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(cfg))
    Qwen3Model(Qwen3Config(vocab_size=len(TOKS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=1024)).save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    return root


def _lora(transformer, blocks: tuple[str, ...], seed: int) -> lora_merge.Adapter:
    """A diffusers-layout LoRA on every Linear of the given blocks (strong enough to matter)."""
    g = torch.Generator().manual_seed(seed)
    ad = lora_merge.Adapter(dialect="diffusers")
    for n, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and n.startswith(blocks):
            name = "transformer." + n
            ad.modules[name] = lora_merge.LoraModule.from_tensors(
                name, torch.randn(2, m.in_features, generator=g) * 0.5, torch.randn(m.out_features, 2, generator=g) * 0.5)
    return ad


def _images(folder: Path, seed: int):
    from PIL import Image

    folder.mkdir()
    for i in range(2):
        arr = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(seed * 10 + i)) * 255).to(torch.uint8)
        Image.fromarray(arr.numpy()).save(folder / f"{i}.png")
    return folder


#: family → (pipeline maker, content blocks, style blocks, the content block's native twin)
CASES = {
    "flux": (make_flux_pipeline, ("single_transformer_blocks.0.",), ("transformer_blocks.1.",),
             "transformer.single_blocks.0"),
    "sd3": (make_sd3_pipeline, ("transformer_blocks.0.",), ("transformer_blocks.1.",), "transformer.joint_blocks.0"),
    "z-image": (make_zimage_pipeline, ("layers.0.",), ("layers.1.",), "transformer.layers.0"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def dit_setup(request, tmp_path_factory):
    family = request.param
    make, c_blocks, s_blocks, twin = CASES[family]
    root = tmp_path_factory.mktemp(f"dit_{family}")
    pipe = make(root / "pipe")
    cls = {"flux": diffusers.FluxTransformer2DModel, "sd3": diffusers.SD3Transformer2DModel,
           "z-image": diffusers.ZImageTransformer2DModel}[family]
    transformer = cls.from_pretrained(pipe / "transformer")
    # the content LoRA in the native layout (fused qkv / linear1), the style LoRA in diffusers names
    native = "comfyui" if family == "z-image" else "kohya"  # (musubi's Z-Image kohya files use diffusers names)
    lora_merge.save(_lora(transformer, c_blocks, 1), root / "content.safetensors", to=native)
    lora_merge.save(_lora(transformer, s_blocks, 2), root / "style.safetensors", to="diffusers")
    assert layout_of(lora_merge.load(root / "content.safetensors"))[1] == "native"
    return {"family": family, "root": root, "pipe": pipe, "content_group": c_blocks[0][:-1],
            "style_group": s_blocks[0][:-1], "twin": twin,
            "c_images": _images(root / "c_images", 1), "s_images": _images(root / "s_images", 2)}


def _measure_cli(s, *extra):
    from click.testing import CliRunner

    from lora_merge.cli import cli

    r = s["root"]
    args = ["priors", "measure", str(r / "content.safetensors"), str(r / "style.safetensors"), "--base", str(s["pipe"]),
            "--content-images", str(s["c_images"]), "--content-prompt", "a sks", "--style-images", str(s["s_images"]),
            "--style-prompt", "zkz style", "--samples", "2", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_base_model_loads_the_pipeline_and_adds_flow_noise(dit_setup):
    from lora_merge.model_mode.base_model import load_base_model

    model = load_base_model(str(dit_setup["pipe"]))
    assert model.arch == dit_setup["family"] and model.lora_prefix == "transformer." and model.image_size == 16
    x0, eps = torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    torch.testing.assert_close(model.add_noise(x0, eps, torch.tensor([250])), 0.75 * x0)  # σ = t / 1000
    cond = model.encode_prompt(["a sks"])
    lat = model.encode_images(torch.zeros(1, 3, 16, 16))
    out = model.predict(lat, torch.tensor([500]), cond)
    assert torch.isfinite(out).all() and out.numel() == lat.numel()


def test_cli_finds_each_lora_in_its_block_and_writes_both_layouts(dit_setup):
    s = dit_setup
    out = s["root"] / "priors.json"
    res = _measure_cli(s, "--json", "-o", str(out), "--force")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    roles = {g["group"]: g["role"] for g in doc["priors"]["groups"]}
    assert roles == {s["content_group"]: "content", s["style_group"]: "style"}, doc["priors"]["groups"]
    assert doc["priors"]["granularity"] == "block" and doc["priors"]["arch"] == s["family"]
    priors = lora_merge.priors.load_priors(str(out), s["family"])
    # the content block is named in both layouts: a kohya (native) merge and a diffusers one see the role
    assert priors.role_of(s["twin"] + ".attn.qkv") == "content" or priors.role_of(s["twin"] + ".linear1") == "content"
    assert priors.role_of(f"transformer.{s['content_group']}.attn.to_q") == "content"
    assert priors.role_of(f"transformer.{s['style_group']}.attn.to_k") == "style"
    # UNet granularities are refused with the reason
    with pytest.raises(UsageError, match="no latent resolutions"):
        _measure_cli(s, "--granularity", "resolution")


def test_duolora_priors_measure_on_the_dit_pipeline(dit_setup):
    s = dit_setup
    r = s["root"]
    params = {"priors": "measure", "base": str(s["pipe"]), "content_images": str(s["c_images"]),
              "content_prompt": "a sks", "style_images": str(s["s_images"]), "style_prompt": "zkz style", "steps": 2}
    res = lora_merge.merge([r / "content.safetensors", r / "style.safetensors"], r / "m.safetensors",
                           strategy="duolora", params=params, force=True)
    rep = res.report["strategy"]["priors"]
    assert {g["group"]: g["role"] for g in rep["measured"]["groups"]} == {s["content_group"]: "content",
                                                                           s["style_group"]: "style"}
    assert set(rep["layers_by_role"]) == {"content", "style"}  # every merged layer got its measured role
    # without --base, the DiT error says what to give
    with pytest.raises(UsageError, match="block table"):
        lora_merge.merge([r / "content.safetensors", r / "style.safetensors"], r / "m2.safetensors",
                         strategy="duolora", params={"steps": 2})


def test_dit_groups_by_block_and_by_layer_with_twins():
    from lora_merge.formats.flux import FLUX
    from lora_merge.priors.measured import group_dit_modules, group_patterns

    names = ["transformer.single_transformer_blocks.10.proj_out", "transformer.transformer_blocks.2.attn.to_q",
             "transformer.single_transformer_blocks.2.attn.to_k", "transformer.transformer_blocks.2.attn.to_k",
             "transformer.x_embedder", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    twins = lambda b: (FLUX.native_block(b),)
    groups, unprobed = group_dit_modules(names, "block", twins)
    assert [g.name for g in groups] == ["transformer_blocks.2", "single_transformer_blocks.2",
                                        "single_transformer_blocks.10"]  # double before single, numeric order
    assert group_patterns(groups[0]) == ["transformer.transformer_blocks.2", "transformer.double_blocks.2"]
    assert len(groups[0].modules) == 2 and set(unprobed) == set(names[4:])
    layers, _ = group_dit_modules(names, "layer", twins)
    assert len(layers) == 4 and all(len(g.modules) == 1 for g in layers)
    with pytest.raises(UsageError, match="no latent resolutions"):
        group_dit_modules(names, "attention")


def test_full_size_flux_and_sd35_predictions_have_the_right_shapes_on_the_meta_device():
    """The packing, position ids, guidance and conditioning of dit_base at the real sizes (FLUX.1-dev and
    SD3.5-medium configs at 1024 px, T5 512 / 333 tokens), run on the meta device: shapes only, no weights."""
    import accelerate

    from lora_merge.model_mode.dit_base import _flux_predict, _sd3_predict

    meta = {"device": "meta"}
    with accelerate.init_empty_weights(include_buffers=True):
        flux = diffusers.FluxTransformer2DModel(guidance_embeds=True)
        sd35 = diffusers.SD3Transformer2DModel(num_layers=24, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
                                               attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536)
    x = torch.empty(1, 16, 128, 128, **meta)
    out = _flux_predict(flux)(x, torch.tensor([500], **meta), {
        "encoder_hidden_states": torch.empty(1, 512, 4096, **meta), "pooled_projections": torch.empty(1, 768, **meta)})
    assert out.shape == (1, 64 * 64, 64)  # 2 × 2 patches of 16 channels, one token each
    out = _sd3_predict(sd35)(x, torch.tensor([500.0], **meta), {
        "encoder_hidden_states": torch.empty(1, 77 + 256, 4096, **meta), "pooled_projections": torch.empty(1, 2048, **meta)})
    assert out.shape == x.shape
