"""Z-Image LoRAs: facts from ``ZImageTransformer2DModel`` (meta device), the original (fused
``attention.qkv``) and diffusers names, diffusers' Z-Image checkpoint and LoRA converters as oracles,
musubi-tuner's kohya names, round trips and the fused × split merge."""
from __future__ import annotations

import pytest
import torch
from conftest import lora_file_from_shapes
from safetensors.torch import load_file

import lora_merge
from lora_merge.formats import dit_arch
from lora_merge.formats.layout import layout_of
from lora_merge.formats.zimage import ZIMAGE

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

SMALL = {"dim": 32, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 16,
         "axes_dims": [4, 6, 6], "axes_lens": [64, 32, 32]}


def _natives(model) -> dict[str, tuple[int, int]]:
    out: dict[str, list] = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            hit = ZIMAGE.diffusers_to_native("transformer." + n) or ("transformer." + n, 0, 1)
            out.setdefault(hit[0], [None] * hit[2])[hit[1]] = tuple(m.weight.shape)
    return {n: (sum(p[0] for p in parts), parts[0][1]) for n, parts in out.items()}


def _file(path, natives, key, rank=2, seed=0):
    return lora_file_from_shapes(path, natives, key, rank, seed)


def _comfy(p):  # the original names; ".lora.down" is the form diffusers' converter splits qkv from
    return f"diffusion_model.{p}.lora.down.weight", f"diffusion_model.{p}.lora.up.weight", f"diffusion_model.{p}.alpha"


def _musubi(p):
    k = "lora_unet_" + p.replace(".", "_")
    return f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"


def test_facts_and_every_module_has_a_name_in_both_layouts():
    model = dit_arch.meta_model("z-image")
    assert len(model.layers) == 30 and len(model.noise_refiner) == 2 and len(model.context_refiner) == 2
    assert model.config.dim == dit_arch.FAMILIES["z-image"].hidden == 3840
    natives = _natives(model)
    assert natives["transformer.layers.0.attention.qkv"] == (3 * 3840, 3840)
    assert "transformer.final_layer.adaLN_modulation.1" in natives and "transformer.x_embedder" in natives


def test_native_file_matches_diffusers_checkpoint_and_lora_converters(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    natives = _natives(dit_arch.meta_model("z-image", **SMALL))
    path = _file(tmp_path / "c.safetensors", natives, _comfy)
    ad = lora_merge.load(path)
    assert ad.dialect == "comfyui" and not ad.unparsed_keys
    assert lora_merge.arch.guess_arch(ad) == "z-image" and layout_of(ad) == ("z-image", "native")
    ours = {m.name: m for m in ZIMAGE.to_diffusers(ad)}
    # the checkpoint converter on dense native ΔW: the same ΔW per diffusers weight
    dense = {m.name[len("transformer."):] + ".weight": m.delta() for m in ad}
    ck = convert_z_image_transformer_checkpoint_to_diffusers(dict(dense))
    assert {f"transformer.{k[:-len('.weight')]}" for k in ck} == set(ours)
    for k, d in ck.items():
        torch.testing.assert_close(ours[f"transformer.{k[:-len('.weight')]}"].delta(), d, rtol=1e-6, atol=1e-7)
    # diffusers' Z-Image LoRA converter reads the file alike, except that it leaves the original names of
    # the top-level modules (final_layer.*, x_embedder), which its model does not have; we rename them
    theirs = _convert_non_diffusers_z_image_lora_to_diffusers(load_file(str(path)))
    renamed = {n: ZIMAGE.native_to_diffusers(n)[0] if n[len("transformer."):] in ZIMAGE.top else n
               for n in {k.rsplit(".", 2)[0] for k in theirs}}
    assert set(renamed.values()) == set(ours)
    assert {n for n, r in renamed.items() if n != r} == {"transformer.final_layer.linear", "transformer.x_embedder",
                                                         "transformer.final_layer.adaLN_modulation.1"}
    for n, r in renamed.items():
        want = theirs[f"{n}.lora_B.weight"] @ theirs[f"{n}.lora_A.weight"]
        torch.testing.assert_close(ours[r].delta(), want, rtol=1e-5, atol=1e-6)


def test_musubi_names_roundtrip_every_dialect_and_merge_with_native(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    natives = _natives(dit_arch.meta_model("z-image", **SMALL))
    diff_names = {}
    for n, (o, i) in natives.items():  # musubi writes the diffusers names (split q/k/v)
        parts = ZIMAGE.native_to_diffusers(n) or (n,)
        for p in parts:
            diff_names[p] = (o // len(parts), i)
    path = _file(tmp_path / "musubi.safetensors", diff_names, _musubi)
    ad = lora_merge.load(path)
    assert ad.dialect == "kohya" and not ad.unparsed_keys and set(ad.modules) == set(diff_names)
    assert layout_of(ad) == ("z-image", "diffusers")
    theirs = _convert_non_diffusers_z_image_lora_to_diffusers(load_file(str(path)))
    assert {k.rsplit(".", 2)[0] for k in theirs} == set(ad.modules)
    for to in ("kohya", "diffusers", "peft", "comfyui"):
        out = tmp_path / (to if to == "peft" else f"{to}.safetensors")
        lora_merge.save(ad, out, to=to)
        back = lora_merge.load(out)
        assert layout_of(back) == ("z-image", "native" if to == "comfyui" else "diffusers"), to
        got = {m.name: m for m in ZIMAGE.to_diffusers(back)}
        for n, m in ad.modules.items():
            torch.testing.assert_close(got[n].delta(), m.delta(), rtol=1e-6, atol=1e-7)
    # our kohya output is musubi's own layout
    assert load_file(str(tmp_path / "kohya.safetensors")).keys() == load_file(str(path)).keys()
    native = _file(tmp_path / "c.safetensors", natives, _comfy, seed=3)
    res = lora_merge.merge([path, native], tmp_path / "m.safetensors", weights=[1.0, 0.5])
    got = {m.name: m.delta() for m in ZIMAGE.to_diffusers(lora_merge.load(res.output))}
    dn = {m.name: m.delta() for m in ZIMAGE.to_diffusers(lora_merge.load(native))}
    for n, m in ad.modules.items():
        torch.testing.assert_close(got[n], m.delta() + 0.5 * dn[n], rtol=1e-5, atol=1e-6)


#: package files that still name Z-Image's facts outside its family and conversion modules (kohya's
#: compound words, the probe order of measured priors, a duolora message, the pipeline's model code)
_ZIMAGE_ELSEWHERE = {"families/__init__.py", "model_mode/dit_base.py", "formats/names.py", "priors/measured.py",
                     "strategies/duolora.py", "strategies/mask_solvers.py", "strategies/pair_masks.py"}


def test_zimage_is_one_family_module_and_its_conversion():
    """Z-Image's data (detection, names, block lists, display name, dialect layouts, pipeline loader, help)
    is lora_merge/families/zimage.py; formats/zimage.py builds the conversion on it."""
    import re
    from pathlib import Path

    from lora_merge import families
    from lora_merge.families import zimage as family_module
    from lora_merge.formats import zimage

    fam = families.get("z-image")
    assert fam is family_module.FAMILY and fam.display == "Z-Image" and fam.kind == "dit"
    assert families.resolve(fam.layout) is zimage.LAYOUT and families.resolve(fam.fused_layout) is zimage.ZIMAGE
    assert set(zimage.ZIMAGE.blocks) == set(fam.block_lists) and zimage.LAYOUT.dialect_layout == fam.dialect_layout
    assert zimage.LAYOUT.layout_for("kohya") == "diffusers" and zimage.LAYOUT.layout_for("comfyui") == "native"
    assert families.by_pipeline("ZImagePipeline") is fam and fam.pipeline_loader.endswith(":load_flow_pipeline")
    root = Path(lora_merge.__file__).parent
    token = re.compile(r"z-image|ZImage|noise_refiner|context_refiner|all_final_layer|all_x_embedder|cap_embedder")
    naming = {p.relative_to(root).as_posix() for p in root.rglob("*.py") if token.search(p.read_text(encoding="utf-8"))}
    assert naming - {"families/zimage.py", "formats/zimage.py"} <= _ZIMAGE_ELSEWHERE, naming
