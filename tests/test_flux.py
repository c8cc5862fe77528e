"""FLUX.1 LoRAs: architecture facts from the diffusers model (meta device), the kohya / ComfyUI / diffusers /
PEFT dialects, exact fused ↔ split conversion, the fused × split merge, and diffusers as an oracle (its
kohya-Flux converter, and its own LoRA loading into a tiny FluxTransformer2DModel)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_merge
from lora_merge.cli import main
from lora_merge.formats import dit_arch, flux
from lora_merge.formats.layout import layout_of

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

H = 3072


def cli(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _native_shapes(h: int, double: range, single: range, top: bool = True) -> dict[str, tuple[int, int]]:
    """kohya Flux module name → (out, in) for the given blocks (MLP ratio 4, as every FLUX.1)."""
    out = {}
    for i in double:
        for s in ("img", "txt"):
            out[f"lora_unet_double_blocks_{i}_{s}_attn_qkv"] = (3 * h, h)
            out[f"lora_unet_double_blocks_{i}_{s}_attn_proj"] = (h, h)
            out[f"lora_unet_double_blocks_{i}_{s}_mlp_0"] = (4 * h, h)
            out[f"lora_unet_double_blocks_{i}_{s}_mlp_2"] = (h, 4 * h)
            out[f"lora_unet_double_blocks_{i}_{s}_mod_lin"] = (6 * h, h)
    for i in single:
        out[f"lora_unet_single_blocks_{i}_linear1"] = (7 * h, h)
        out[f"lora_unet_single_blocks_{i}_linear2"] = (h, 5 * h)
        out[f"lora_unet_single_blocks_{i}_modulation_lin"] = (3 * h, h)
    if top:
        out["lora_unet_img_in"] = (h, 64)
        out["lora_unet_txt_in"] = (h, 4096 if h == H else 32)
        out["lora_unet_final_layer_linear"] = (64, h)
        out["lora_unet_final_layer_adaLN_modulation_1"] = (2 * h, h)
    return out


def _kohya_file(path, shapes, rank=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for j, (name, (o, i)) in enumerate(shapes.items()):
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, i, generator=g) / i**0.5).to(dtype)
        sd[f"{name}.lora_up.weight"] = (torch.randn(o, rank, generator=g) * 0.1).to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(float(rank * (1 + j % 3)))
    save_file(sd, str(path))
    return path


def _split_deltas(ad) -> dict[str, torch.Tensor]:
    """ΔW of every diffusers-layout module (fused modules split first)."""
    return {m.name: m.delta() for m in flux.to_diffusers(ad)}


# ---------------------------------------------------------------- architecture facts
def test_flux_facts_match_the_diffusers_model_on_the_meta_device():
    model = dit_arch.meta_model("flux")
    cfg = model.config
    facts = dit_arch.FAMILIES["flux"]
    assert (cfg.num_layers, cfg.num_single_layers) == (19, 38) == tuple(facts.blocks.values())
    assert cfg.num_attention_heads * cfg.attention_head_dim == facts.hidden == H
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # every kohya Flux name maps to diffusers modules that exist, and their stacked rows are the fused size
    native = _native_shapes(H, range(19), range(38))
    native["lora_unet_txt_in"] = (H, 4096)
    covered = set()
    for kname, (o, i) in native.items():
        canon, _ = lora_merge.formats.names.kohya_to_canonical(kname)
        parts = flux.native_to_diffusers(canon)
        assert parts, kname
        rel = [p[len("transformer."):] for p in parts]
        assert all(r in shapes for r in rel), (kname, rel)
        assert sum(shapes[r][0] for r in rel) == o and {shapes[r][1] for r in rel} == {i}, kname
        covered.update(rel)
    # the native names cover every attention and MLP module of the model
    for n in shapes:
        if ".attn." in n or ".ff" in n or "proj_mlp" in n or n.endswith("proj_out"):
            assert n in covered, n


# ---------------------------------------------------------------- dialects, full config names
def test_every_dialect_roundtrips_a_full_size_flux_file_exactly(tmp_path):
    src = _kohya_file(tmp_path / "k.safetensors", _native_shapes(H, range(19), range(38)), rank=1)
    ad = lora_merge.load(src)
    assert ad.dialect == "kohya" and not ad.unparsed_keys
    assert lora_merge.arch.guess_arch(ad) == "flux" and layout_of(ad) == ("flux", "native")
    fam = dit_arch.family_summary(ad)
    assert fam["blocks"] == {"double": 19, "single": 38} and fam["attention"] == "fused"
    split = {m.name: m for m in flux.to_diffusers(ad)}
    for to in ("diffusers", "peft", "comfyui", "kohya"):
        out = tmp_path / (to if to == "peft" else f"{to}.safetensors")
        lora_merge.save(ad, out, to=to)
        back = lora_merge.load(out)
        assert back.dialect == to
        want = "diffusers" if to in ("diffusers", "peft") else "native"
        assert layout_of(back) == ("flux", want), to
        for m in flux.to_diffusers(back):  # same factors and scale ⇒ the same ΔW, bit for bit
            ref = split[m.name]
            assert m.scale == ref.scale, (to, m.name)
            assert all(torch.equal(x, y) for x, y in zip(m.factors(), ref.factors())), (to, m.name)
        assert len(split) == len(flux.to_diffusers(back).modules)
    # kohya → diffusers → kohya gives the original modules back (shared downs fuse to the same rank)
    k2 = lora_merge.load(tmp_path / "kohya.safetensors")
    assert {n: m.rank for n, m in k2.modules.items()} == {n: m.rank for n, m in ad.modules.items()}
    # every ComfyUI key is a diffusion_model key of the original (BFL) checkpoint naming
    keys = load_file(str(tmp_path / "comfyui.safetensors")).keys()
    assert all(k.startswith("diffusion_model.") and flux.is_native("transformer." + k[16:].rsplit(".", 2)[0]
                                                                    if not k.endswith(".alpha") else
                                                                    "transformer." + k[16:-6]) for k in keys)


def test_split_to_fused_is_exact_for_unshared_downs_and_different_scales(tmp_path):
    g = torch.Generator().manual_seed(1)
    h = 16
    ad = lora_merge.Adapter(dialect="diffusers")
    for j, part in enumerate(("to_q", "to_k", "to_v", "proj_mlp")):
        out = 4 * h if part == "proj_mlp" else h
        name = f"transformer.single_transformer_blocks.0.{'attn.' if part != 'proj_mlp' else ''}{part}"
        if part == "to_k":
            continue  # a missing part is a zero block
        r = 2 + j
        ad.modules[name] = lora_merge.LoraModule.from_tensors(name, torch.randn(r, h, generator=g),
                                                              torch.randn(out, r, generator=g), alpha=float(j + 1))
    fused = flux.to_native(ad)
    (m,) = fused.modules.values()
    assert m.name == "transformer.single_blocks.0.linear1" and m.rank == 2 + 4 + 5
    dense = m.delta()
    want = torch.zeros(7 * h, h)
    rows = {"to_q": 0, "to_v": 2 * h, "proj_mlp": 3 * h}
    for n, x in ad.modules.items():
        part = n.rsplit(".", 1)[-1]
        want[rows[part]:rows[part] + x.out_features] = x.delta()
    torch.testing.assert_close(dense, want, rtol=1e-6, atol=1e-6)
    back = {x.name: x for x in flux.to_diffusers(fused)}
    for n, x in ad.modules.items():
        torch.testing.assert_close(back[n].delta(), x.delta(), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(back["transformer.single_transformer_blocks.0.attn.to_k"].delta()) == 0


# ---------------------------------------------------------------- diffusers' kohya-Flux converter as an oracle
def test_our_kohya_flux_reader_matches_diffusers_converter(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    shapes = _native_shapes(H, (0, 18), (0, 37), top=False)
    shapes.pop("lora_unet_double_blocks_0_img_mlp_0")  # keep the dense references small
    shapes.pop("lora_unet_double_blocks_0_txt_mlp_0")
    path = _kohya_file(tmp_path / "k.safetensors", shapes, rank=2)
    theirs = _convert_kohya_flux_lora_to_diffusers(load_file(str(path)))
    ours = {m.name: m for m in flux.to_diffusers(lora_merge.load(path))}
    assert {k.rsplit(".", 2)[0] for k in theirs} == set(ours)
    # and diffusers' converter reads what our kohya writer writes (from the split diffusers layout) alike
    ours_kohya = lora_merge.save(flux.to_diffusers(lora_merge.load(path)), tmp_path / "ours.safetensors", to="kohya")
    theirs_of_ours = _convert_kohya_flux_lora_to_diffusers(load_file(str(ours_kohya)))
    assert theirs_of_ours.keys() == theirs.keys()
    g = torch.Generator().manual_seed(9)
    for name, m in ours.items():  # ΔW·X for a random X (the dense ΔW of 300 full-size modules is slow)
        # float64 products: diffusers folds the scale into fp32 factors, so the factors themselves differ
        # by fp32 rounding; the tolerance is relative to the largest entry (entries near 0 carry no signal)
        x = torch.randn(m.in_features, 3, generator=g, dtype=torch.float64)
        b, a = (f.double() for f in m.factors())
        want = theirs[f"{name}.lora_B.weight"].double() @ (theirs[f"{name}.lora_A.weight"].double() @ x)
        tol = 1e-5 * float(want.abs().max())
        torch.testing.assert_close(m.scale * (b @ (a @ x)), want, rtol=1e-5, atol=tol)
        want2 = (theirs_of_ours[f"{name}.lora_B.weight"].double()
                 @ (theirs_of_ours[f"{name}.lora_A.weight"].double() @ x))
        torch.testing.assert_close(want2, want, rtol=1e-5, atol=tol)


# ---------------------------------------------------------------- diffusers loads what we write
TINY = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
            "num_attention_heads": 2, "joint_attention_dim": 24, "pooled_projection_dim": 12, "axes_dims_rope": (2, 2, 4)}


def _tiny_inputs():
    g = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(1, 4, 16, generator=g),
                "encoder_hidden_states": torch.randn(1, 3, 24, generator=g),
                "pooled_projections": torch.randn(1, 12, generator=g), "timestep": torch.tensor([0.5]),
                "img_ids": torch.zeros(4, 3), "txt_ids": torch.zeros(3, 3), "return_dict": False}


@pytest.mark.parametrize("to", ["diffusers"])  # (diffusers' kohya converter hard-codes the full-size dims)
def test_diffusers_loads_our_flux_output_and_changes_outputs_by_delta_w(tmp_path, to):
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**TINY).eval()
    h = 16
    shapes = _native_shapes(h, range(1), range(1), top=False)
    shapes["lora_unet_final_layer_adaLN_modulation_1"] = (2 * h, h)
    src = _kohya_file(tmp_path / "k.safetensors", shapes, rank=2, seed=5)
    out = lora_merge.save(lora_merge.load(src), tmp_path / f"{to}.safetensors", to=to)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, d in _split_deltas(lora_merge.load(out)).items():
            ref.get_submodule(name[len("transformer."):]).weight += d
        want = ref(**_tiny_inputs())[0]
        base = model(**_tiny_inputs())[0]
    state, metadata = diffusers.FluxPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_lora_adapter(state, prefix="transformer", adapter_name="ours", metadata=metadata)
    with torch.no_grad():
        got = model(**_tiny_inputs())[0]
    assert (want - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- fused × split merge
def _tiny_pair(tmp_path):
    h = 16
    a = _kohya_file(tmp_path / "a_kohya.safetensors", _native_shapes(h, range(2), range(2), top=False), 3, 7)
    b_native = lora_merge.load(_kohya_file(tmp_path / "b_src.safetensors",
                                           _native_shapes(h, range(1, 3), range(2), top=False), 2, 8))
    b = lora_merge.save(b_native, tmp_path / "b_diffusers.safetensors", to="diffusers")
    return a, b


@pytest.mark.parametrize("to", ["diffusers", "kohya"])
def test_fused_kohya_and_split_diffusers_flux_loras_merge_exactly(tmp_path, to):
    a, b = _tiny_pair(tmp_path)
    assert layout_of(lora_merge.load(a)) == ("flux", "native")
    assert layout_of(lora_merge.load(b)) == ("flux", "diffusers")
    res = lora_merge.merge([a, b], tmp_path / f"m_{to}.safetensors", weights=[0.7, 0.4], to=to)
    got = _split_deltas(lora_merge.load(res.output))
    da, db = _split_deltas(lora_merge.load(a)), _split_deltas(lora_merge.load(b))
    assert set(got) == set(da) | set(db)
    for name, d in got.items():
        want = 0.7 * da.get(name, torch.zeros_like(d)) + 0.4 * db.get(name, torch.zeros_like(d))
        torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-6)
    want_layout = "native" if to == "kohya" else "diffusers"
    assert layout_of(lora_merge.load(res.output)) == ("flux", want_layout)


def test_cli_inspect_shows_flux_layout_and_arch_can_be_forced(tmp_path, capsys):
    a, b = _tiny_pair(tmp_path)
    code, out, err = cli(["inspect", a, "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["architecture"] == "flux" and s["dit"]["attention"] == "fused"
    assert s["dit"]["blocks"] == {"double": 2, "single": 2}
    code, out, _ = cli(["inspect", b], capsys)
    assert code == 0 and "split to_q" in out
    # a double-blocks-only diffusers Flux LoRA of a small model looks like SD3; --arch flux forces it
    ad = lora_merge.load(b)
    only = lora_merge.Adapter(modules={n: m for n, m in ad.modules.items() if "single" not in n},
                              dialect="diffusers")
    p = lora_merge.save(only, tmp_path / "double_only.safetensors", to="diffusers")
    code, out, _ = cli(["inspect", p, "--json"], capsys)
    assert json.loads(out)["dit"]["family"] == "sd3"  # same names as SD3; only the hidden size (3072) tells
    code, out, _ = cli(["inspect", p, "--json", "--arch", "flux"], capsys)
    assert json.loads(out)["dit"]["family"] == "flux"


# ---------------------------------------------------------------- bad input
def test_fused_module_that_does_not_split_is_one_line_error_and_no_output(tmp_path, capsys):
    h = 16
    path = _kohya_file(tmp_path / "bad.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (3 * h + 1, h),
                                                     "lora_unet_single_blocks_0_linear2": (h, 5 * h)})
    out = tmp_path / "out.safetensors"
    code, _, err = cli(["convert", path, out, "--to", "diffusers"], capsys)
    assert code != 0 and not out.exists()
    line = err.strip().splitlines()[-1]
    assert "bad.safetensors" in line and "lora_unet_double_blocks_0_img_attn_qkv" in line and "does not split" in line


def test_flux_file_merged_with_an_sdxl_file_is_refused(tmp_path, capsys):
    a, _ = _tiny_pair(tmp_path)
    g = torch.Generator().manual_seed(0)
    sdxl = {}
    for n, (o, i) in {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
                      "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048)}.items():
        sdxl[f"{n}.lora_down.weight"] = torch.randn(2, i, generator=g)
        sdxl[f"{n}.lora_up.weight"] = torch.randn(o, 2, generator=g)
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    out = tmp_path / "m.safetensors"
    code, _, err = cli(["merge", a, tmp_path / "sdxl.safetensors", "-o", out], capsys)
    assert code != 0 and not out.exists()
    line = err.strip().splitlines()[-1]
    assert "a_kohya.safetensors" in line and "sdxl.safetensors" in line, err


def test_diff_lines_up_a_fused_kohya_file_with_its_split_diffusers_conversion(tmp_path, capsys):
    a, _ = _tiny_pair(tmp_path)
    d = lora_merge.save(lora_merge.load(a), tmp_path / "a_diffusers.safetensors", to="diffusers")
    code, out, err = cli(["diff", a, d, "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert not s["only_in_a"] and not s["only_in_b"] and s["max_rel_diff"] < 1e-6
    assert any(r["name"].endswith("attn.to_q") for r in s["modules"])


def test_xlabs_flux_file_reads_like_diffusers_converter(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(11)
    h, r = H, 2
    sd = {}
    for i in (0, 18):
        for p, o in (("qkv_lora1", 3 * h), ("proj_lora1", h), ("qkv_lora2", 3 * h), ("proj_lora2", h)):
            sd[f"double_blocks.{i}.processor.{p}.down.weight"] = torch.randn(r, h, generator=g)
            sd[f"double_blocks.{i}.processor.{p}.up.weight"] = torch.randn(o, r, generator=g)
    sd["single_blocks.3.processor.qkv_lora.down.weight"] = torch.randn(r, h, generator=g)
    sd["single_blocks.3.processor.qkv_lora.up.weight"] = torch.randn(3 * h, r, generator=g)
    save_file(sd, str(tmp_path / "xlabs.safetensors"))
    ad = lora_merge.load(tmp_path / "xlabs.safetensors")
    assert ad.dialect == "xlabs" and layout_of(ad) == ("flux", "native")
    theirs = _convert_xlabs_flux_lora_to_diffusers(dict(sd))
    ours = {m.name: m for m in flux.to_diffusers(ad)}
    x = torch.randn(h, 3, generator=g)
    for key in theirs:
        if not key.endswith("lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        b, a = ours[name].factors()
        want = theirs[f"{name}.lora_B.weight"] @ (theirs[key] @ x)
        torch.testing.assert_close(ours[name].scale * (b @ (a @ x)), want)
    # the MLP rows of linear1 are zero (XLabs' single-block LoRA touches q, k, v only)
    assert torch.count_nonzero(ours["transformer.single_transformer_blocks.3.proj_mlp"].up.load()) == 0
    out = lora_merge.save(ad, tmp_path / "k.safetensors", to="kohya")
    assert lora_merge.load(out).dialect == "kohya"


def test_per_block_table_keeps_double_and_single_blocks_apart():
    from lora_merge.arch import block_of

    assert block_of("transformer.double_blocks.3.img_attn.qkv") == "transformer.double_blocks.3"
    assert block_of("transformer.single_blocks.3.linear1") == "transformer.single_blocks.3"
    assert block_of("transformer.joint_blocks.0.x_block.attn.qkv") == "transformer.joint_blocks.0"
    assert block_of("text_encoder.text_model.encoder.layers.11.mlp.fc1") == "text_encoder.layers.11"
