"""SD3/3.5 LoRAs in the MMDiT layout (kohya sd-scripts ``lora_unet_joint_blocks_…``, ComfyUI
``diffusion_model.joint_blocks.…``) and the diffusers layout: the name map against diffusers' own SD3
checkpoint converter, exact fused ↔ split conversion, the fused × split merge, and diffusers loading our
output into a tiny ``SD3Transformer2DModel``."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import run_cli as cli
from safetensors.torch import load_file, save_file

import lora_merge
from lora_merge.formats import dit_arch, sd3
from lora_merge.formats.layout import layout_of

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

#: a tiny SD3.5-medium-like model: 3 blocks, SD3.5's second attention in block 0, RMS qk-norm
TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 3,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 24, "caption_projection_dim": 16,
        "pooled_projection_dim": 12, "pos_embed_max_size": 8, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(**TINY).eval()


def _weighted(model) -> dict[str, tuple[int, ...]]:
    """diffusers module path → weight shape, for every Linear and Conv2d."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def _native_modules(model) -> dict[str, tuple[int, ...]]:
    """Every native module our map gives for the model's weighted modules → its (fused) weight shape."""
    out: dict[str, list] = {}
    for n, shape in _weighted(model).items():
        hit = sd3.diffusers_to_native("transformer." + n)
        if hit is None:
            continue
        native, i, k = hit
        slot = out.setdefault(native, [None] * k)
        slot[i] = shape
    return {n: (sum(s[0] for s in parts), *parts[0][1:]) for n, parts in out.items()}


def _native_checkpoint(model) -> dict[str, torch.Tensor]:
    """The model's state dict renamed to Stability's MMDiT keys with *our* map (fused q/k/v concatenated,
    swapped halves swapped), plus the few non-module keys; diffusers' converter must undo it exactly."""
    sd = model.state_dict()
    parts: dict[str, list] = {}
    ck: dict[str, torch.Tensor] = {"pos_embed": sd["pos_embed.pos_embed"]}
    for key, t in sd.items():
        mod, _, kind = key.rpartition(".")
        hit = sd3.diffusers_to_native("transformer." + mod)
        if hit is None:
            continue
        native, i, k = hit
        parts.setdefault(f"{native[len('transformer.'):]}.{kind}", [None] * k)[i] = t
    for key, ts in parts.items():
        t = torch.cat(ts)
        native = "transformer." + key.rsplit(".", 1)[0]
        w = sd[sd3.native_to_diffusers(native)[0][len("transformer."):] + ".weight"]
        if sd3.SD3.swaps(native, int(t.shape[0]), int(w.shape[1]) if w.dim() > 1 else 0):
            a, b = t.chunk(2)
            t = torch.cat([b, a])
        ck[key] = t
    for key, t in sd.items():  # qk norms: attn.norm_q → x_block.attn.ln_q, norm_added_q → context_block.attn.ln_q
        m = key.split(".")
        if m[0] == "transformer_blocks" and m[3].startswith("norm_") and m[2] in ("attn", "attn2"):
            stream = "context_block" if "added" in m[3] else "x_block"
            ck[f"joint_blocks.{m[1]}.{stream}.{m[2]}.ln_{m[3][-1]}.weight"] = t
    return ck


def _convert(ck):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(ck))


def _kohya_file(path, natives: dict[str, tuple], rank=2, seed=0):
    """A kohya sd-scripts SD3 LoRA over the given native modules (conv ones get a 1×1 up and k×k down)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for j, (native, shape) in enumerate(natives.items()):
        k = "lora_unet_" + native[len("transformer."):].replace(".", "_")
        o, i = shape[0], shape[1]
        if len(shape) == 4:
            sd[f"{k}.lora_down.weight"] = torch.randn(rank, i, *shape[2:], generator=g) / i**0.5
            sd[f"{k}.lora_up.weight"] = torch.randn(o, rank, 1, 1, generator=g) * 0.1
        else:
            sd[f"{k}.lora_down.weight"] = torch.randn(rank, i, generator=g) / i**0.5
            sd[f"{k}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.1
        sd[f"{k}.alpha"] = torch.tensor(float(rank * (1 + j % 3)))
    save_file(sd, str(path))
    return path


def _dense_native(path) -> dict[str, torch.Tensor]:
    """ΔW of every module of a kohya file, straight from its tensors (not through our reader)."""
    sd = load_file(str(path))
    out = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            base = k[:-len(".lora_down.weight")]
            a, b = sd[k].float(), sd[f"{base}.lora_up.weight"].float()
            r = a.shape[0]
            d = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:]) * float(sd[f"{base}.alpha"]) / r
            out[base[len("lora_unet_"):]] = d
    return out


def _oracle_deltas(model, dense_native: dict[str, torch.Tensor], kohya_to_path) -> dict[str, torch.Tensor]:
    """diffusers' converter applied to (base + ΔW) minus applied to base: ΔW per diffusers weight."""
    base_ck = _native_checkpoint(model)
    ck = dict(base_ck)
    for flat, d in dense_native.items():
        key = kohya_to_path[flat] + ".weight"
        ck[key] = ck[key] + d.reshape(ck[key].shape)
    a, b = _convert(ck), _convert(base_ck)
    return {k[:-len(".weight")]: a[k] - b[k] for k in a if k.endswith(".weight") and not torch.equal(a[k], b[k])}


# ---------------------------------------------------------------- the name map
def test_native_names_cover_every_module_of_sd3_and_sd35_configs():
    for config in ({}, {"num_layers": 24, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
                        "attention_head_dim": 64, "num_attention_heads": 24, "caption_projection_dim": 1536}):
        model = dit_arch.meta_model("sd3", **config)
        shapes = _weighted(model)
        covered = set()
        for native in _native_modules(model):
            parts = [p[len("transformer."):] for p in sd3.native_to_diffusers(native)]
            covered.update(parts)
        missing = {n for n in shapes if n not in covered}
        assert not missing, sorted(missing)[:5]  # every Linear/Conv2d of the model has a native name


def test_our_name_map_matches_diffusers_sd3_checkpoint_converter():
    model = _tiny_model()
    got = _convert(_native_checkpoint(model))
    want = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ---------------------------------------------------------------- kohya sd-scripts files, diffusers as the oracle
def test_kohya_sd3_reader_matches_diffusers_converter_and_roundtrips_every_dialect(tmp_path):
    model = _tiny_model()
    natives = _native_modules(model)
    path = _kohya_file(tmp_path / "k.safetensors", natives)
    ad = lora_merge.load(path)
    assert ad.dialect == "kohya" and not ad.unparsed_keys
    assert lora_merge.arch.guess_arch(ad) == "sd3" and layout_of(ad) == ("sd3", "native")
    fam = dit_arch.family_summary(ad)
    assert fam["blocks"] == {"transformer_blocks": 3} and fam["attention"] == "fused"
    flat_to_path = {n[len("transformer."):].replace(".", "_"): n[len("transformer."):] for n in natives}
    oracle = _oracle_deltas(model, _dense_native(path), flat_to_path)
    ours = {m.name[len("transformer."):]: m for m in sd3.to_diffusers(ad)}
    assert set(ours) == set(oracle)
    for name, m in ours.items():
        torch.testing.assert_close(m.delta().reshape(oracle[name].shape), oracle[name], rtol=1e-5, atol=1e-6)
    split = {m.name: m for m in sd3.to_diffusers(ad)}
    for to in ("diffusers", "peft", "comfyui", "kohya"):
        out = tmp_path / (to if to == "peft" else f"{to}.safetensors")
        lora_merge.save(ad, out, to=to)
        back = lora_merge.load(out)
        assert back.dialect == to and layout_of(back) == ("sd3", "native" if to in ("kohya", "comfyui")
                                                           else "diffusers"), to
        for m in sd3.to_diffusers(back):  # same factors and scale: the same ΔW, bit for bit
            ref = split[m.name]
            assert m.scale == ref.scale and all(torch.equal(x, y) for x, y in zip(m.factors(), ref.factors()))
    # kohya → diffusers → kohya gives the original modules and ranks back
    k2 = lora_merge.load(tmp_path / "kohya.safetensors")
    assert {n: m.rank for n, m in k2.modules.items()} == {n: m.rank for n, m in ad.modules.items()}
    # every ComfyUI key is a diffusion_model.<MMDiT module> of the original checkpoint's naming
    ck = _native_checkpoint(model)
    for k in load_file(str(tmp_path / "comfyui.safetensors")):
        mod = k[len("diffusion_model."):].rsplit(".", 2 if k.endswith(".weight") else 1)[0]
        assert k.startswith("diffusion_model.") and f"{mod}.weight" in ck, k


def test_our_kohya_sd3_writer_matches_diffusers_converter(tmp_path):
    """A diffusers SD3 LoRA with its own down per q/k/v, written as kohya (fused, rank summed), has the
    same ΔW per diffusers module as diffusers' converter makes of our native tensors."""
    model = _tiny_model()
    g = torch.Generator().manual_seed(4)
    ad = lora_merge.Adapter(dialect="diffusers")
    for n, shape in _weighted(model).items():
        if n.startswith("transformer_blocks.") and ("attn" in n or "norm1_context" in n):
            full = "transformer." + n
            ad.modules[full] = lora_merge.LoraModule.from_tensors(
                full, torch.randn(2, shape[1], generator=g), torch.randn(shape[0], 2, generator=g) * 0.1,
                alpha=float(1 + len(ad.modules) % 3))
    out = lora_merge.save(ad, tmp_path / "ours_kohya.safetensors", to="kohya")
    keys = load_file(str(out)).keys()
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1.alpha" in keys  # the last block's
    natives = _native_modules(model)
    flat_to_path = {n[len("transformer."):].replace(".", "_"): n[len("transformer."):] for n in natives}
    oracle = _oracle_deltas(model, _dense_native(out), flat_to_path)
    assert set(oracle) == {n[len("transformer."):] for n in ad.modules}
    for n, m in ad.modules.items():
        torch.testing.assert_close(oracle[n[len("transformer."):]], m.delta(), rtol=1e-5, atol=1e-6)


def test_diffusers_loads_our_conversion_of_a_kohya_sd3_file_and_outputs_change_by_delta_w(tmp_path, diffusers_loads):
    model = _tiny_model()
    natives = {n: s for n, s in _native_modules(model).items() if ".joint_blocks." in n or "final_layer" in n}
    src = _kohya_file(tmp_path / "k.safetensors", natives, seed=5)
    out = lora_merge.convert(src, tmp_path / "d.safetensors", to="diffusers")
    flat_to_path = {n[len("transformer."):].replace(".", "_"): n[len("transformer."):] for n in natives}
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, d in _oracle_deltas(model, _dense_native(src), flat_to_path).items():
            ref.get_submodule(name).weight += d
    g = torch.Generator().manual_seed(3)
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8, generator=g),
              "encoder_hidden_states": torch.randn(1, 3, 24, generator=g),
              "pooled_projections": torch.randn(1, 12, generator=g), "timestep": torch.tensor([500.0]),
              "return_dict": False}
    diffusers_loads(model, ref, diffusers.StableDiffusion3Pipeline, out, inputs)


# ---------------------------------------------------------------- merge, inspect, bad input
def test_fused_kohya_and_split_diffusers_sd3_loras_merge_exactly(tmp_path, capsys):
    model = _tiny_model()
    natives = {n: s for n, s in _native_modules(model).items() if ".joint_blocks." in n}
    a = _kohya_file(tmp_path / "a_kohya.safetensors", natives, rank=3, seed=7)
    b_src = _kohya_file(tmp_path / "b_src.safetensors",
                        {n: s for n, s in natives.items() if "joint_blocks.0." not in n}, rank=2, seed=8)
    b = lora_merge.convert(b_src, tmp_path / "b_diffusers.safetensors", to="diffusers")
    assert layout_of(lora_merge.load(b)) == ("sd3", "diffusers")
    da = {m.name: m.delta() for m in sd3.to_diffusers(lora_merge.load(a))}
    db = {m.name: m.delta() for m in lora_merge.load(b)}
    for to in ("kohya", "diffusers", "comfyui"):
        res = lora_merge.merge([a, b], tmp_path / f"m_{to}.safetensors", weights=[0.7, 0.4], to=to)
        got = {m.name: m.delta() for m in sd3.to_diffusers(lora_merge.load(res.output))}
        assert set(got) == set(da) | set(db)
        for name, d in got.items():
            want = 0.7 * da.get(name, torch.zeros_like(d)) + 0.4 * db.get(name, torch.zeros_like(d))
            torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-6)
    code, out, err = cli(["inspect", a, "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["architecture"] == "sd3" and s["dit"]["attention"] == "fused" and s["dit"]["layout"] == "native"
    code, out, err = cli(["diff", a, tmp_path / "m_diffusers.safetensors", "--json"], capsys)
    assert code == 0, err


def test_sd3_fused_qkv_that_does_not_split_is_one_line_error_and_no_output(tmp_path, capsys):
    path = _kohya_file(tmp_path / "bad.safetensors", {"transformer.joint_blocks.0.x_block.attn.qkv": (49, 16),
                                                     "transformer.joint_blocks.0.x_block.mlp.fc2": (16, 64)})
    out = tmp_path / "out.safetensors"
    code, _, err = cli(["convert", path, out, "--to", "diffusers"], capsys)
    assert code != 0 and not out.exists()
    line = err.strip().splitlines()[-1]
    assert "bad.safetensors" in line and "lora_unet_joint_blocks_0_x_block_attn_qkv" in line and "does not split" in line


def test_kohya_te3_names_restore_every_t5_module_of_sd3():
    """kohya's SD3 files name the T5-XXL encoder ``lora_te3_…`` (``wi_0`` / ``wi_1`` keep their ``_``)."""
    from transformers import T5Config, T5EncoderModel

    from lora_merge.formats import names

    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2,
                                 feed_forward_proj="gated-gelu"))
    lin = [n for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)]
    assert any(n.endswith("wi_0") for n in lin)
    for n in lin:
        kname = names.canonical_to_kohya(f"text_encoder_3.{n}")
        assert kname == "lora_te3_" + n.replace(".", "_")
        assert names.kohya_to_canonical(kname) == (f"text_encoder_3.{n}", False), n


def test_older_lora_merge_kohya_sd3_names_still_read_and_convert_with_a_loader_note(tmp_path, capsys):
    """Before the MMDiT names, lora-merge wrote SD3 kohya files as ``lora_transformer_<diffusers path>``."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for mod in ("attn_to_q", "attn_to_k", "attn_to_v", "attn_add_k_proj"):
        k = f"lora_transformer_transformer_blocks_0_{mod}"
        sd[f"{k}.lora_down.weight"] = torch.randn(2, 16, generator=g)
        sd[f"{k}.lora_up.weight"] = torch.randn(16, 2, generator=g)
        sd[f"{k}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(tmp_path / "old.safetensors"))
    ad = lora_merge.load(tmp_path / "old.safetensors")
    assert layout_of(ad) == ("sd3", "diffusers")
    code, _, err = cli(["convert", tmp_path / "old.safetensors", tmp_path / "new.safetensors", "--to", "kohya"], capsys)
    assert code == 0, err
    assert "load_lora_weights converts no SD3 names" in err
    new = lora_merge.load(tmp_path / "new.safetensors")
    assert set(new.modules) == {"transformer.joint_blocks.0.x_block.attn.qkv",
                                "transformer.joint_blocks.0.context_block.attn.qkv"}
    for m in sd3.to_diffusers(new):
        if m.name in ad.modules:
            torch.testing.assert_close(m.delta(), ad[m.name].delta(), rtol=1e-5, atol=1e-5)
