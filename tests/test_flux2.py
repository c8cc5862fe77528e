"""FLUX.2 LoRAs: facts from ``Flux2Transformer2DModel`` (meta device), detection apart from FLUX.1, the
native ↔ diffusers map against diffusers' own FLUX.2 checkpoint converter, its LoRA converters, the
round trips, the fused × split merge, and diffusers loading our output into a tiny model."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import lora_file_from_shapes, run_cli
from safetensors.torch import load_file, save_file

import lora_merge
from lora_merge.formats import dit_arch
from lora_merge.formats.flux2 import FLUX2
from lora_merge.formats.layout import layout_of

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

TINY = {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 8,
        "num_attention_heads": 2, "joint_attention_dim": 24, "timestep_guidance_channels": 16,
        "axes_dims_rope": (2, 2, 2, 2)}


def _linears(model):
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _natives(model) -> dict[str, tuple[int, int]]:
    out: dict[str, list] = {}
    for n, shape in _linears(model).items():
        hit = FLUX2.diffusers_to_native("transformer." + n)
        assert hit is not None, n  # every Linear of the model has a native name
        out.setdefault(hit[0], [None] * hit[2])[hit[1]] = shape
    return {n: (sum(p[0] for p in parts), parts[0][1]) for n, parts in out.items()}


def _file(path, natives, key, rank=2, seed=0, alpha=True):
    return lora_file_from_shapes(path, natives, key, rank, seed, alpha)


def _kohya(p):
    k = "lora_unet_" + p.replace(".", "_")
    return f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"


def _comfy(p):
    return f"diffusion_model.{p}.lora_A.weight", f"diffusion_model.{p}.lora_B.weight", None


def _tiny():
    torch.manual_seed(0)
    return diffusers.Flux2Transformer2DModel(**TINY).eval()


def test_facts_and_every_module_of_the_full_config_has_a_native_name():
    model = dit_arch.meta_model("flux2")
    facts = dit_arch.FAMILIES["flux2"]
    assert len(model.transformer_blocks) == 8 and len(model.single_transformer_blocks) == 48
    assert model.config.num_attention_heads * model.config.attention_head_dim == facts.hidden == 6144
    natives = _natives(model)
    assert natives["transformer.single_blocks.0.linear1"] == (9 * 6144, 6144)  # q, k, v + SwiGLU MLP input


def test_our_map_matches_diffusers_flux2_checkpoint_converter(tmp_path):
    """ΔW of a kohya FLUX.2 file, as dense native weights through diffusers' checkpoint converter, equals
    our reader's ΔW per diffusers module — including the swapped halves of final_layer.adaLN_modulation.1."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    model = _tiny()
    natives = _natives(model)
    path = _file(tmp_path / "k.safetensors", natives, _kohya)
    ad = lora_merge.load(path)
    assert lora_merge.arch.guess_arch(ad) == "flux2" and layout_of(ad) == ("flux2", "native")
    assert not ad.unparsed_keys
    dense = {m.name[len("transformer."):] + ".weight": m.delta() for m in ad}
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(dense))
    ours = {m.name[len("transformer."):] + ".weight": m.delta() for m in FLUX2.to_diffusers(ad)}
    assert set(ours) == set(theirs)
    for k, d in ours.items():
        torch.testing.assert_close(d, theirs[k], rtol=1e-6, atol=1e-7)
    assert "norm_out.linear.weight" in ours


def test_diffusers_flux2_lora_converters_agree_except_the_final_modulation(tmp_path):
    """diffusers' ai-toolkit/ComfyUI and kohya FLUX.2 LoRA converters give our modules and ΔW; on
    final_layer.adaLN_modulation.1 they skip the swap their checkpoint converter makes (a diffusers bug),
    so there ours equals theirs with the halves exchanged."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_flux2_lora_to_diffusers,
        _convert_non_diffusers_flux2_lora_to_diffusers,
    )

    natives = _natives(_tiny())
    for name, key, conv, alpha in (("comfy", _comfy, _convert_non_diffusers_flux2_lora_to_diffusers, False),
                                   ("kohya", _kohya, _convert_kohya_flux2_lora_to_diffusers, True)):
        path = _file(tmp_path / f"{name}.safetensors", natives, key, alpha=alpha)
        theirs = conv(load_file(str(path)))
        ad = lora_merge.load(path)
        assert lora_merge.arch.guess_arch(ad) == "flux2", name
        ours = {m.name: m for m in FLUX2.to_diffusers(ad)}
        assert {k.rsplit(".", 2)[0] for k in theirs} <= set(ours), name
        for n in {k.rsplit(".", 2)[0] for k in theirs}:
            want = theirs[f"{n}.lora_B.weight"].float() @ theirs[f"{n}.lora_A.weight"].float()
            if n.endswith("norm_out.linear"):
                a, b = want.chunk(2)
                want = torch.cat([b, a])
            torch.testing.assert_close(ours[n].delta(), want, rtol=1e-5, atol=1e-6)


def test_every_dialect_roundtrips_and_fused_kohya_merges_with_split_diffusers(tmp_path):
    natives = _natives(_tiny())
    ad = lora_merge.load(_file(tmp_path / "k.safetensors", natives, _kohya))
    split = {m.name: m for m in FLUX2.to_diffusers(ad)}
    for to in ("diffusers", "peft", "comfyui", "kohya"):
        out = tmp_path / (to if to == "peft" else f"{to}.safetensors")
        lora_merge.save(ad, out, to=to)
        back = lora_merge.load(out)
        assert layout_of(back) == ("flux2", "native" if to in ("kohya", "comfyui") else "diffusers"), to
        for m in FLUX2.to_diffusers(back):
            r = split[m.name]
            assert m.scale == r.scale and all(torch.equal(x, y) for x, y in zip(m.factors(), r.factors())), (to, m.name)
    b_src = lora_merge.load(_file(tmp_path / "b.safetensors",
                                  {n: s for n, s in natives.items() if ".1." in n}, _kohya, rank=3, seed=4))
    b = lora_merge.save(b_src, tmp_path / "b_diffusers.safetensors", to="diffusers")
    res = lora_merge.merge([tmp_path / "k.safetensors", b], tmp_path / "m.safetensors", weights=[0.5, 1.5])
    got = {m.name: m.delta() for m in FLUX2.to_diffusers(lora_merge.load(res.output))}
    db = {m.name: m.delta() for m in lora_merge.load(b)}
    for n, d in got.items():
        want = 0.5 * split[n].delta() + 1.5 * db.get(n, torch.zeros_like(d))
        torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-6)
    assert dit_arch.family_summary(ad)["blocks"] == {"double": 2, "single": 2}


def test_flux1_and_flux2_files_are_not_merged_together(tmp_path):
    from lora_merge.errors import MergeError

    f2 = _file(tmp_path / "f2.safetensors", {"transformer.single_blocks.0.linear1": (9 * 16, 16)}, _kohya)
    f1 = _file(tmp_path / "f1.safetensors", {"transformer.single_blocks.0.linear1": (7 * 16, 16)}, _kohya)
    assert lora_merge.arch.guess_arch(lora_merge.load(f1)) == "flux"
    with pytest.raises(MergeError, match="FLUX"):
        lora_merge.merge([f1, f2], tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_diffusers_loads_our_flux2_output_and_outputs_change_by_delta_w(tmp_path, diffusers_loads):
    model = _tiny()
    natives = {n: s for n, s in _natives(model).items() if "blocks" in n}
    src = _file(tmp_path / "k.safetensors", natives, _kohya, seed=5)
    out = lora_merge.convert(src, tmp_path / "d.safetensors", to="diffusers")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in lora_merge.load(out):
            ref.get_submodule(m.name[len("transformer."):]).weight += m.delta()
    g = torch.Generator().manual_seed(3)
    inputs = {"hidden_states": torch.randn(1, 4, 16, generator=g), "encoder_hidden_states": torch.randn(1, 3, 24, generator=g),
              "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(4, 4), "txt_ids": torch.zeros(3, 4),
              "guidance": torch.tensor([3.5]), "return_dict": False}
    diffusers_loads(model, ref, diffusers.Flux2Pipeline, out, inputs)


def test_a_lokr_file_on_fused_qkv_splits_exactly(tmp_path, capsys):
    """LoKr is common for FLUX.2: a Kronecker update of the fused qkv has no shared-A split, so its exact
    dense ΔW is split by rows (diffusers instead targets the model's fused to_qkv)."""
    g = torch.Generator().manual_seed(2)
    h = 16
    sd = {"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.randn(4, 4, generator=g),
          "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": torch.randn(3 * h // 4, h // 4, generator=g),
          "diffusion_model.single_blocks.0.linear1.lokr_w1": torch.randn(3, 2, generator=g),
          "diffusion_model.single_blocks.0.linear1.lokr_w2": torch.randn(9 * h // 3, h // 2, generator=g)}
    save_file(sd, str(tmp_path / "lokr.safetensors"))
    ad = lora_merge.load(tmp_path / "lokr.safetensors")
    assert lora_merge.arch.guess_arch(ad) == "flux2"
    fused = {m.name: m.delta() for m in ad}
    out = tmp_path / "d.safetensors"
    code, _, err = run_cli(["convert", tmp_path / "lokr.safetensors", out, "--to", "diffusers", "--rank", h], capsys)
    assert code == 0, err
    got = {m.name: m.delta() for m in lora_merge.load(out)}
    q = fused["transformer.double_blocks.0.img_attn.qkv"]
    torch.testing.assert_close(q, torch.kron(sd["diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1"],
                                             sd["diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2"]))
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(got[f"transformer.transformer_blocks.0.attn.{part}"], q[i * h:(i + 1) * h],
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj"],
                               fused["transformer.single_blocks.0.linear1"], rtol=1e-4, atol=1e-5)


def test_an_attention_only_diffusers_lora_of_full_size_flux2_is_flux2():
    ad = lora_merge.Adapter(dialect="diffusers")
    n = "transformer.transformer_blocks.0.attn.to_q"
    ad.modules[n] = lora_merge.LoraModule.from_tensors(n, torch.zeros(1, 6144), torch.zeros(6144, 1))
    assert lora_merge.arch.guess_arch(ad) == "flux2"
