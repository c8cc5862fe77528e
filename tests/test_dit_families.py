"""SD3/3.5, Wan 2.x and Qwen-Image: facts from the diffusers classes on the meta device, detection, and
round trips through every LoRA dialect on synthetic files built from the full configs' module names."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lora_merge
from lora_merge.formats import dit_arch, sd3, wan
from lora_merge.formats.layout import layout_of

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")


def _linears(model):
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("family,blocks", [("sd3", {"transformer_blocks": 18}), ("wan", {"blocks": 40}),
                                           ("qwen-image", {"transformer_blocks": 60})])
def test_facts_match_the_diffusers_model_on_the_meta_device(family, blocks):
    model = dit_arch.meta_model(family)
    facts = dit_arch.FAMILIES[family]
    assert facts.blocks == blocks
    for lst, n in blocks.items():
        assert len(getattr(model, lst)) == n
    assert model.config.num_attention_heads * model.config.attention_head_dim == facts.hidden


def _lora_file(path, shapes, key, rank=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for j, (name, (o, i)) in enumerate(shapes.items()):
        down, up, alpha = key(name)
        sd[down] = torch.randn(rank, i, generator=g)
        sd[up] = torch.randn(o, rank, generator=g)
        if alpha:
            sd[alpha] = torch.tensor(float(1 + j % 4))
    save_file(sd, str(path))
    return path


def _roundtrip_all(tmp_path, src, family):
    ad = lora_merge.load(src)
    assert lora_merge.arch.guess_arch(ad) == family and not ad.unparsed_keys
    to_diffusers = {"wan": wan.LAYOUT.to_diffusers, "sd3": sd3.to_diffusers}.get(family, lambda a: a)
    ref = {m.name: m for m in to_diffusers(ad)}
    for to in ("diffusers", "peft", "kohya", "comfyui"):
        out = tmp_path / (to if to == "peft" else f"{to}.safetensors")
        lora_merge.save(ad, out, to=to)
        back = lora_merge.load(out)
        assert lora_merge.arch.guess_arch(back) == family, to
        mods = to_diffusers(back)
        assert set(mods.modules) == set(ref), to
        for m in mods:
            r = ref[m.name]
            if m.rank == r.rank:  # same factors and scale: the same ΔW, bit for bit
                assert m.scale == r.scale and all(torch.equal(x, y) for x, y in zip(m.factors(), r.factors())), (to, m.name)
            else:  # split parts with their own downs were fused block-diagonally (rank summed): same ΔW·X
                assert to in ("kohya", "comfyui") and family == "sd3", (to, m.name)
                x = torch.randn(m.in_features, 2, generator=torch.Generator().manual_seed(0))
                (b, a), (rb, ra) = m.factors(), r.factors()
                want = r.scale * (rb @ (ra @ x))
                torch.testing.assert_close(m.scale * (b @ (a @ x)), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    return ad


def test_wan_musubi_comfyui_and_diffusers_names_roundtrip_exactly(tmp_path):
    model = dit_arch.meta_model("wan")
    lin = _linears(model)
    shapes = {n: s for n, s in lin.items() if n.startswith("blocks.") and wan.diffusers_to_native("transformer." + n)}
    assert len(shapes) == 40 * 10  # q, k, v, o of both attentions and the two FFN layers, per block
    # musubi-tuner / kohya: lora_unet_blocks_0_self_attn_q
    def kohya_key(n):
        k = "lora_unet_" + wan.diffusers_to_native("transformer." + n)[len("transformer."):].replace(".", "_")
        return f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"
    ad = _roundtrip_all(tmp_path, _lora_file(tmp_path / "musubi.safetensors", shapes, kohya_key), "wan")
    assert layout_of(ad) == ("wan", "native")
    assert dit_arch.family_summary(ad)["blocks"] == {"blocks": 40}
    # ComfyUI: diffusion_model.blocks.0.self_attn.q
    def comfy_key(n):
        k = "diffusion_model." + wan.diffusers_to_native("transformer." + n)[len("transformer."):]
        return f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"
    ad2 = lora_merge.load(_lora_file(tmp_path / "c.safetensors", shapes, comfy_key))
    assert ad2.dialect == "comfyui" and set(ad2.modules) == set(ad.modules)


def test_sd3_and_qwen_image_diffusers_names_roundtrip_exactly(tmp_path):
    for family in ("sd3", "qwen-image"):
        lin = _linears(dit_arch.meta_model(family))
        shapes = {n: s for n, s in lin.items() if n.startswith("transformer_blocks.") and ".attn." in n}
        d = tmp_path / family
        d.mkdir()
        key = lambda n: (f"transformer.{n}.lora_A.weight", f"transformer.{n}.lora_B.weight", None)
        ad = _roundtrip_all(d, _lora_file(d / "src.safetensors", shapes, key), family)
        assert dit_arch.family_summary(ad)["family"] == family


def test_wan_musubi_and_diffusers_loras_merge_exactly(tmp_path):
    g = torch.Generator().manual_seed(1)
    a, b = lora_merge.Adapter(dialect="kohya"), lora_merge.Adapter(dialect="diffusers")
    for i in range(2):
        for nat, dif in (("self_attn.q", "attn1.to_q"), ("cross_attn.o", "attn2.to_out.0"), ("ffn.0", "ffn.net.0.proj")):
            o = 32 if "ffn" in nat else 16
            na, nb = f"transformer.blocks.{i}.{nat}", f"transformer.blocks.{i}.{dif}"
            a.modules[na] = lora_merge.LoraModule.from_tensors(na, torch.randn(2, 16, generator=g), torch.randn(o, 2, generator=g))
            b.modules[nb] = lora_merge.LoraModule.from_tensors(nb, torch.randn(3, 16, generator=g), torch.randn(o, 3, generator=g), alpha=6.0)
    pa = lora_merge.save(a, tmp_path / "musubi.safetensors", to="kohya")
    pb = lora_merge.save(b, tmp_path / "diffusers.safetensors", to="diffusers")
    assert layout_of(lora_merge.load(pa)) == ("wan", "native") and layout_of(lora_merge.load(pb)) == ("wan", "diffusers")
    res = lora_merge.merge([pa, pb], tmp_path / "m.safetensors", weights=[0.5, 1.0], to="diffusers")
    got = lora_merge.load(res.output)
    for nb, mb in b.modules.items():
        ma = a.modules[wan.diffusers_to_native(nb)]
        torch.testing.assert_close(got[nb].delta(), 0.5 * ma.delta() + mb.delta(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dialect", ["musubi", "comfyui"])
def test_qwen_image_non_diffusers_files_read_like_diffusers_converter(tmp_path, dialect):
    """musubi-tuner (``lora_unet_transformer_blocks_0_img_mlp_net_0_proj``) and ComfyUI
    (``diffusion_model.transformer_blocks.0.attn.to_q``) Qwen-Image files, every Linear of the model
    (top-level ones included): same module names and ΔW as diffusers' own Qwen converter gives."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers
    from safetensors.torch import load_file

    lin = _linears(dit_arch.meta_model("qwen-image", num_layers=2))
    if dialect == "musubi":
        def key(n):
            k = "lora_unet_" + n.replace(".", "_")
            return f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"
    else:
        def key(n):
            return f"diffusion_model.{n}.lora_down.weight", f"diffusion_model.{n}.lora_up.weight", f"diffusion_model.{n}.alpha"
    path = _lora_file(tmp_path / "q.safetensors", lin, key, rank=2)
    theirs = _convert_non_diffusers_qwen_lora_to_diffusers(load_file(str(path)))
    ad = lora_merge.load(path)
    assert not ad.unparsed_keys and lora_merge.arch.guess_arch(ad) == "qwen-image"
    assert set(ad.modules) == {k.rsplit(".", 2)[0] for k in theirs}
    g = torch.Generator().manual_seed(0)
    for name, m in ad.modules.items():
        x = torch.randn(m.in_features, 2, generator=g)
        b, a = m.factors()
        want = theirs[f"{name}.lora_B.weight"] @ (theirs[f"{name}.lora_A.weight"] @ x)
        torch.testing.assert_close(m.scale * (b @ (a @ x)), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # our kohya output is musubi's layout (lora_unet_<path>), which diffusers' converter reads alike
    out = lora_merge.save(ad, tmp_path / "ours.safetensors", to="kohya")
    keys = load_file(str(out)).keys()
    assert all(k.startswith("lora_unet_") for k in keys)
    assert _convert_non_diffusers_qwen_lora_to_diffusers(load_file(str(out))).keys() == theirs.keys()
