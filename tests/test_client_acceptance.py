"""Client acceptance: every *default* output of a merge or a conversion of SD 1.5
and SDXL LoRAs (tiny UNets and text encoders built from configs, real module names) loads in diffusers with
every module applied at the right scale and no key or alpha warnings, and every module is covered by a
ComfyUI key map derived here from public facts (no ComfyUI code):

- ComfyUI maps a kohya name ``lora_unet_<diffusers module path, '.' → '_'>`` for every UNet weight, and
  ``lora_unet_<ldm/SGM module path, '.' → '_'>`` for the same weights under Stability's block names (the
  SGM ↔ diffusers table of docs/formats.md, re-derived below on its own); text encoders are
  ``lora_te_`` (SD 1.x), ``lora_te1_`` / ``lora_te2_`` (SDXL CLIP-L / CLIP-G) + the transformers path;
  each module has ``.lora_down.weight``, ``.lora_up.weight`` and an optional ``.alpha``.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

SD15 = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": (32, 32, 64, 64),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 8}
SDXL = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": (32, 64, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "attention_head_dim": (2, 4, 4),
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 80, "norm_num_groups": 8}
TINY_CLIP = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "projection_dim": 32}
TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def _targets(model):
    """The layers LoRA trainers target (kohya: every UNet Linear/Conv2d, the text encoders' attention and
    MLP layers, not CLIP's text_projection)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TYPES) and "text_projection" not in n}


_MODELS: dict = {}


def _models(arch):
    """Fresh copies of the tiny models (built once per architecture)."""
    import copy

    if arch not in _MODELS:
        _MODELS[arch] = _build(arch)
    unet, tes = _MODELS[arch]
    return copy.deepcopy(unet), {k: copy.deepcopy(v) for k, v in tes.items()}


def _build(arch):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**(SD15 if arch == "sd15" else SDXL)).eval()
    # CLIPTextModelWithProjection keeps the ``text_model.`` level that SD files name (transformers 5's
    # CLIPTextModel dropped it); text_projection is excluded from the targets
    te = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY_CLIP)).eval()
    tes = {"text_encoder": te}
    if arch == "sdxl":
        tes["text_encoder_2"] = te
    return unet, tes


def _lora(unet, tes, seed, every=1, dialect="diffusers", alpha=None):
    """A LoRA on every ``every``-th Linear/Conv2d of the UNet and text encoders, mixed ranks and alphas
    (or one ``alpha``)."""
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect=dialect)
    parts = [("unet", unet), *tes.items()]
    i = 0
    for prefix, model in parts:
        for n, m in _targets(model).items():
            i += 1
            if i % every:
                continue
            name, r = f"{prefix}.{n}", 1 + i % 3
            if isinstance(m, torch.nn.Linear):
                down, up = torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g)
            else:
                down = torch.randn(r, m.in_channels, *m.kernel_size, generator=g)
                up = torch.randn(m.out_channels, r, 1, 1, generator=g)
            ad.modules[name] = LoraModule.from_tensors(name, down * 0.1, up * 0.1, alpha=float(alpha or 1 + i % 4))
    return ad


# ---------------------------------------------------------------- ComfyUI's key names, derived independently
def _sgm_name(path: str, unet) -> str | None:
    """The ldm/SGM module path of a diffusers UNet module path (docs/formats.md table), or None."""
    p = path.split(".")
    lpb = unet.config.layers_per_block
    res = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}
    if p[0] == "conv_in":
        return "input_blocks.0.0"
    if p[0] == "conv_out":
        return "out.2"
    if p[0] == "time_embedding":
        return {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[p[1]]
    if p[0] == "add_embedding":
        return {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}[p[1]]
    if p[0] == "down_blocks":
        b = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{(lpb + 1) * b + lpb + 1}.0.op"
        idx = (lpb + 1) * b + int(p[3]) + 1
        if p[2] == "resnets":
            return f"input_blocks.{idx}.0.{res[p[4]]}"
        return ".".join([f"input_blocks.{idx}.1", *p[4:]])
    if p[0] == "mid_block":
        if p[1] == "attentions":
            return ".".join(["middle_block.1", *p[3:]])
        return f"middle_block.{0 if p[2] == '0' else 2}.{res[p[3]]}"
    if p[0] == "up_blocks":
        b = int(p[1])
        if p[2] == "upsamplers":
            has_attn = getattr(unet.up_blocks[b], "attentions", None) is not None
            return f"output_blocks.{(lpb + 1) * b + lpb}.{2 if has_attn else 1}.conv"
        idx = (lpb + 1) * b + int(p[3])
        if p[2] == "resnets":
            return f"output_blocks.{idx}.0.{res[p[4]]}"
        return ".".join([f"output_blocks.{idx}.1", *p[4:]])
    return None


def comfyui_key_map(arch, unet, tes) -> dict[str, str]:
    """kohya module name → the model module it applies to, as ComfyUI maps them."""
    out = {}
    for n in _targets(unet):
        out["lora_unet_" + n.replace(".", "_")] = f"unet.{n}"
        sgm = _sgm_name(n, unet)
        if sgm is not None:
            out["lora_unet_" + sgm.replace(".", "_")] = f"unet.{n}"
    te_prefix = {"text_encoder": "lora_te_" if arch == "sd15" else "lora_te1_", "text_encoder_2": "lora_te2_"}
    for comp, model in tes.items():
        for n in _targets(model):
            out[te_prefix[comp] + n.replace(".", "_")] = f"{comp}.{n}"
    return out


def test_sgm_derivation_is_a_bijection_on_sdxl():
    unet, _ = _models("sdxl")
    names = [_sgm_name(n, unet) for n in _targets(unet)]
    assert None not in names and len(set(names)) == len(names)


# ---------------------------------------------------------------- the default outputs
def _default_outputs(tmp_path, arch, unet, tes):
    k = 1 if arch == "sd15" else 3  # SDXL: every third layer (800 modules make PEFT's pattern matching slow)
    a, b = _lora(unet, tes, 1, every=k), _lora(unet, tes, 2, every=2 * k)
    fa, fb = lm.save(a, tmp_path / "a.safetensors", to="diffusers"), lm.save(b, tmp_path / "b.safetensors",
                                                                                 to="diffusers")
    outs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing-module and dense-strategy notes
        outs["merge linear"] = lm.merge([fa, fb], tmp_path / "linear.safetensors", weights=[0.7, 0.5]).output
        outs["merge ties"] = lm.merge([fa, fb], tmp_path / "ties.safetensors", strategy="ties").output
        outs["merge svd --rank 2"] = lm.merge([fa, fb], tmp_path / "svd.safetensors", strategy="svd", rank=2).output
    from lora_merge.cli import main

    one = lm.save(_lora(unet, tes, 4, every=k, alpha=4.0), tmp_path / "one.safetensors", to="diffusers")
    with pytest.raises(SystemExit) as exc:  # a conversion keeps alphas bit for bit: one alpha, as most LoRAs
        main(["convert", str(one), str(tmp_path / "conv.safetensors")])
    assert exc.value.code == 0
    outs["convert"] = tmp_path / "conv.safetensors"
    return outs


def _applies_exactly(unet, tes, path, caplog):
    """diffusers' own loaders on the file: every module attached, scales exact, no key/alpha warnings."""
    from peft.tuners.lora import LoraLayer

    ours = lm.load(path)
    loader = diffusers.StableDiffusionXLPipeline if "text_encoder_2" in tes else diffusers.StableDiffusionPipeline
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        sd, alphas = loader.lora_state_dict(str(path), unet_config=unet.config)
        unet.load_lora_adapter(sd, prefix="unet", network_alphas=alphas, adapter_name="t")
    # text encoders: diffusers' kohya converter must give every TE module its real name and our alpha
    from lora_merge.formats import diffusers as fd

    te_keys = {fd.parse_key(k)[0] for k in sd if k.startswith("text_encoder")}
    te_real = {f"{comp}.{n}" for comp, te in tes.items() for n in _targets(te)}
    te_ours = {n for n in ours.modules if n.startswith("text_encoder")}
    assert te_keys == te_ours and te_keys <= te_real
    te_alphas = {fd.parse_key(k.removesuffix(".alpha"))[0]: v for k, v in alphas.items()
                 if k.startswith("text_encoder")}
    assert te_alphas == {n: pytest.approx(ours[n].alpha) for n in te_ours}
    msgs = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    bad = [m for m in msgs if "did not match" in m or "unexpected" in m.lower() or "not loaded" in m
           or "missing" in m.lower()]
    assert not bad, (path.name, bad[:2])
    loaded = {f"unet.{n}": m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert set(loaded) == {n for n in ours.modules if n.startswith("unet.")}
    for name, layer in loaded.items():
        theirs = layer.get_delta_weight("t")
        want = ours[name].delta(flat=False)
        torch.testing.assert_close(theirs, want.reshape(theirs.shape), rtol=1e-5,
                                   atol=1e-5 * float(want.abs().max()))
    return ours


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_default_outputs_load_everywhere(tmp_path, caplog, arch):
    from safetensors import safe_open

    outs = _default_outputs(tmp_path, arch, *_models(arch))
    keymap = comfyui_key_map(arch, *_models(arch))
    for what, path in outs.items():
        unet, tes = _models(arch)  # fresh models: no adapter of the previous file
        ours = _applies_exactly(unet, tes, path, caplog)
        assert ours.dialect == "kohya", what
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        mods = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}
        assert mods and all(m in keymap for m in mods), (what, sorted(mods - set(keymap))[:3])
        assert {keymap[m] for m in mods} == set(ours.modules), what
        for m in mods:  # ComfyUI's layout per module: lora_up, lora_down, alpha
            assert {f"{m}.lora_up.weight", f"{m}.alpha"} <= keys
        merged_alphas = {m.alpha for m in ours}
        assert len(merged_alphas) == 1, what  # one alpha: diffusers scales it exactly


def test_kohya_output_with_mixed_alphas_warns_with_the_fix(tmp_path):
    from lora_merge.formats.clients import LoaderWarning

    unet, tes = _models("sd15")
    src = lm.save(_lora(unet, tes, 5), tmp_path / "d.safetensors", to="diffusers")
    with pytest.warns(LoaderWarning, match=r"different alphas.*diffusers.*--to diffusers"):
        lm.convert(src, tmp_path / "k.safetensors", to="kohya")


def test_diffusers_output_is_not_in_the_comfyui_map_and_the_cli_says_so(tmp_path, capsys):
    from lora_merge.cli import main

    unet, tes = _models("sd15")
    src = lm.save(_lora(unet, tes, 3), tmp_path / "k.safetensors", to="kohya")
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers"])
    err = capsys.readouterr().err
    assert exc.value.code == 0 and "ComfyUI" in err and "--to kohya" in err
    keymap = comfyui_key_map("sd15", unet, tes)
    d = lm.load(tmp_path / "d.safetensors")
    attn = [n for n in d.modules if n.startswith("unet.") and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")]
    assert attn and not any(n in keymap for n in attn)  # our diffusers keys are not kohya names


def test_convert_without_to_refuses_non_sd_adapters(tmp_path, capsys):
    from lora_merge.cli import main

    ad = Adapter(dialect="peft", config={"peft_type": "LORA", "r": 2, "lora_alpha": 2})
    ad.modules["h.0.attn.c_attn"] = LoraModule.from_tensors("h.0.attn.c_attn", torch.randn(2, 8), torch.randn(8, 2))
    src = lm.save(ad, tmp_path / "p", to="peft")
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(src), str(tmp_path / "o.safetensors")])
    assert exc.value.code != 0 and "--to is required" in capsys.readouterr().err
