"""Issue 14's last gaps: merge --base-weights (DoRA inputs), bias ``diff_b`` deltas, DuoLoRA on DiT families
(the Flux block-role priors table) and every strategy on a fused kohya × split diffusers Flux pair."""
from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import lora_merge
from lora_merge.cli import main
from lora_merge.engine import Recipe, run_merge
from lora_merge.formats.layout import align, layout_of


def cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _file(path, sd):
    save_file(sd, str(path))
    return path


# ---------------------------------------------------------------- 1. merge --base-weights
def _dora_pair(tmp_path):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(8, 8, generator=g)
    base = _file(tmp_path / "base.safetensors", {"double_blocks.0.img_attn.proj.weight": w})
    files, want = [], []
    for i in range(2):
        a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
        mag = torch.rand(1, 8, generator=g) + 0.5
        key = "lora_unet_double_blocks_0_img_attn_proj"
        files.append(_file(tmp_path / f"dora{i}.safetensors", {
            f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(2.0),
            f"{key}.dora_scale": mag}))
        new = w + b @ a
        want.append(mag * new / new.norm(dim=0, keepdim=True) - w)
    return base, files, want


def test_merge_base_weights_makes_dora_inputs_exact_and_records_its_sha256(tmp_path, capsys):
    base, (d0, d1), (w0, w1) = _dora_pair(tmp_path)
    out = tmp_path / "m.safetensors"
    code, _, err = cli(["merge", d0, d1, "-o", out, "--weights", "0.6,0.3"], capsys)
    line = err.strip().splitlines()[-1]
    assert code != 0 and not out.exists() and "DoRA" in line and "--base-weights" in line
    code, _, err = cli(["merge", d0, d1, "-o", out, "--weights", "0.6,0.3", "--rank", "8",
                        "--base-weights", base], capsys)
    assert code == 0, err
    ad = lora_merge.load(out)
    torch.testing.assert_close(ad["transformer.double_blocks.0.img_attn.proj"].delta(), 0.6 * w0 + 0.3 * w1,
                               rtol=1e-4, atol=1e-5)
    rec = json.loads(ad.metadata["lora_merge.recipe"])
    assert rec["base_weights"] == {"path": "base.safetensors",
                                   "sha256": hashlib.sha256(base.read_bytes()).hexdigest()}
    # the Python API takes it too, and a recorded base_weights is checked on replay
    res = lora_merge.merge([d0, d1], weights=[0.6, 0.3], rank=8, base_weights=base)
    torch.testing.assert_close(res.adapter["transformer.double_blocks.0.img_attn.proj"].delta(),
                               0.6 * w0 + 0.3 * w1, rtol=1e-4, atol=1e-5)
    recipe = Recipe.from_dict({**rec, "inputs": [d0, d1],
                                          "base_weights": {"path": str(base), "sha256": "0" * 64}})
    with pytest.raises(lora_merge.errors.MergeError, match="base weights: sha256"):
        run_merge(recipe)


def test_base_weights_is_not_recorded_when_no_input_is_dora(tmp_path):
    base, _, _ = _dora_pair(tmp_path)
    g = torch.Generator().manual_seed(1)
    key = "lora_unet_double_blocks_0_img_attn_proj"
    p = _file(tmp_path / "plain.safetensors", {f"{key}.lora_down.weight": torch.randn(2, 8, generator=g),
                                               f"{key}.lora_up.weight": torch.randn(8, 2, generator=g)})
    res = lora_merge.merge([p, p], base_weights=base)
    assert "base_weights" not in res.report["recipe"]


# ---------------------------------------------------------------- 2. bias deltas (diff_b)
H = 16


def _flux_kohya_with_bias(path, seed, blocks=range(1), rank=2):
    """kohya Flux LoRA (fused qkv and linear1, h=16) with a diff_b on every module."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for i in blocks:
        shapes[f"lora_unet_double_blocks_{i}_img_attn_qkv"] = (3 * H, H)
        shapes[f"lora_unet_double_blocks_{i}_img_attn_proj"] = (H, H)
        shapes[f"lora_unet_single_blocks_{i}_linear1"] = (7 * H, H)
        shapes[f"lora_unet_single_blocks_{i}_linear2"] = (H, 5 * H)
    sd = {}
    for j, (k, (o, i)) in enumerate(shapes.items()):
        sd[f"{k}.lora_down.weight"] = torch.randn(rank, i, generator=g) / i**0.5
        sd[f"{k}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.1
        sd[f"{k}.alpha"] = torch.tensor(float(rank * (1 + j % 2)))
        sd[f"{k}.diff_b"] = torch.randn(o, generator=g)
    return _file(path, sd), sd


def test_diff_b_is_read_shown_merged_as_a_weighted_sum_and_written_by_kohya(tmp_path, capsys):
    a, sda = _flux_kohya_with_bias(tmp_path / "a.safetensors", 1)
    b, sdb = _flux_kohya_with_bias(tmp_path / "b.safetensors", 2)
    ad = lora_merge.load(a)
    qkv = "transformer.double_blocks.0.img_attn.qkv"
    torch.testing.assert_close(ad[qkv].bias.load(), sda["lora_unet_double_blocks_0_img_attn_qkv.diff_b"])
    code, out, err = cli(["inspect", a, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["bias_deltas"] == 4
    code, out, err = cli(["inspect", a], capsys)
    assert "bias deltas (diff_b): 4 modules" in out
    # merged: Σ w_i·b_i with no LoRA scale (alpha/r differs from 1 here), in kohya and comfyui names
    for to, suffix in (("kohya", "lora_unet_double_blocks_0_img_attn_qkv"),
                       ("comfyui", "diffusion_model.double_blocks.0.img_attn.qkv")):
        res = lora_merge.merge([a, b], tmp_path / f"m_{to}.safetensors", weights=[0.7, 0.4], to=to,
                               layer_weights=["single_blocks=0.5"])
        from safetensors.torch import load_file
        got = load_file(str(res.output))
        for k in ("double_blocks_0_img_attn_qkv", "double_blocks_0_img_attn_proj", "single_blocks_0_linear1"):
            c = 0.5 if "single" in k else 1.0
            want = c * (0.7 * sda[f"lora_unet_{k}.diff_b"] + 0.4 * sdb[f"lora_unet_{k}.diff_b"])
            key = f"lora_unet_{k}.diff_b" if to == "kohya" else \
                "diffusion_model." + k.replace("_blocks_0_", "_blocks.0.").replace("attn_", "attn.") + ".diff_b"
            torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-6)
        assert f"{suffix}.diff_b" in got
        back = lora_merge.load(res.output)  # and reads back onto its module
        assert back[qkv].bias is not None


def test_diff_b_splits_with_fused_modules_and_is_dropped_with_one_warning_by_diffusers(tmp_path):
    a, sda = _flux_kohya_with_bias(tmp_path / "a.safetensors", 3)
    from lora_merge.formats import flux
    split = {m.name: m for m in flux.to_diffusers(lora_merge.load(a))}
    qkv_b = sda["lora_unet_double_blocks_0_img_attn_qkv.diff_b"]
    torch.testing.assert_close(split["transformer.transformer_blocks.0.attn.to_k"].bias.load(), qkv_b[H:2 * H])
    l1 = sda["lora_unet_single_blocks_0_linear1.diff_b"]
    torch.testing.assert_close(split["transformer.single_transformer_blocks.0.proj_mlp"].bias.load(), l1[3 * H:])
    fused = flux.to_native(flux.to_diffusers(lora_merge.load(a)))  # and fuses back exactly
    torch.testing.assert_close(fused["transformer.single_blocks.0.linear1"].bias.load(), l1)
    with pytest.warns(UserWarning, match=r"cannot hold bias deltas \(diff_b\); not written") as rec:
        lora_merge.save(lora_merge.load(a), tmp_path / "d.safetensors", to="diffusers")
    assert sum("diff_b" in str(w.message) for w in rec) == 1


def test_diff_b_of_the_wrong_size_or_without_a_module_is_one_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    k = "lora_unet_double_blocks_0_img_attn_proj"
    base = {f"{k}.lora_down.weight": torch.randn(2, H, generator=g), f"{k}.lora_up.weight": torch.randn(H, 2, generator=g)}
    p = _file(tmp_path / "bad.safetensors", {**base, f"{k}.diff_b": torch.randn(H + 1, generator=g)})
    with pytest.raises(lora_merge.errors.FormatError, match="diff_b has shape"):
        lora_merge.load(p)
    p = _file(tmp_path / "lone.safetensors", {**base, "lora_unet_double_blocks_0_txt_attn_proj.diff_b": torch.zeros(H)})
    with pytest.raises(lora_merge.errors.FormatError, match="without a weight update"):
        lora_merge.load(p)


# ---------------------------------------------------------------- 3. DuoLoRA on DiT families
def _flux_pair(tmp_path):
    """A fused kohya FLUX.1 LoRA and a split diffusers one (h=16; double blocks 0-1, single blocks 0-1, 10-11)."""
    g = torch.Generator().manual_seed(21)

    def shapes(blocks):
        out = {}
        for i in blocks[0]:
            out[f"lora_unet_double_blocks_{i}_img_attn_qkv"] = (3 * H, H)
            out[f"lora_unet_double_blocks_{i}_txt_attn_proj"] = (H, H)
        for i in blocks[1]:
            out[f"lora_unet_single_blocks_{i}_linear1"] = (7 * H, H)
            out[f"lora_unet_single_blocks_{i}_linear2"] = (H, 5 * H)
        return out

    def kohya(path, sh, rank):
        sd = {}
        for k, (o, i) in sh.items():
            sd[f"{k}.lora_down.weight"] = torch.randn(rank, i, generator=g) / i**0.5
            sd[f"{k}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.1
            sd[f"{k}.alpha"] = torch.tensor(float(rank))
        return _file(path, sd)

    a = kohya(tmp_path / "content_kohya.safetensors", shapes((range(2), (0, 1, 10, 11))), 3)
    b_src = kohya(tmp_path / "style_src.safetensors", shapes((range(1, 2), (0, 10, 11))), 2)
    b = lora_merge.save(lora_merge.load(b_src), tmp_path / "style_diffusers.safetensors", to="diffusers")
    return a, b


def test_duolora_on_flux_needs_priors_and_runs_with_the_splitflux_table(tmp_path, capsys):
    a, b = _flux_pair(tmp_path)
    out = tmp_path / "duo.safetensors"
    code, _, err = cli(["merge", a, b, "-o", out, "--strategy", "duolora", "--steps", "5"], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and not out.exists() and len(lines) == 1, err
    assert "DiT" in lines[0] and "--priors measure" in lines[0] and "flux-splitflux" in lines[0]
    code, _, err = cli(["merge", a, b, "-o", out, "--strategy", "duolora", "--steps", "5",
                        "--priors", "flux-splitflux", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert lora_merge.load(out).modules
    rep = json.loads((tmp_path / "r.json").read_text())
    assert "SplitFlux" in rep["strategy"]["priors"]["source"]
    roles = {row["name"]: row.get("role") for row in rep["layers"] if "role" in row} if isinstance(
        rep["layers"], list) else {k: v.get("role") for k, v in rep["layers"].items()}
    assert {"content", "style", "neutral"} <= set(roles.values()), roles


# ---------------------------------------------------------------- 4. every strategy on a Flux pair
STRATEGY_PARAMS = {
    "linear": {}, "svd": {}, "ties": {"density": 0.5}, "dare": {"density": 0.5},
    "magnitude-prune": {"density": 0.5}, "blocks": {"take": "1:double_blocks,2:single_blocks"},
    "ziplora": {"steps": 5}, "duolora": {"steps": 5, "priors": "flux-splitflux"}, "np-lora": {},
}


def test_every_registered_strategy_has_a_flux_case():
    from lora_merge.strategies import available_strategies
    assert set(available_strategies()) <= set(STRATEGY_PARAMS)


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
@pytest.mark.parametrize("strategy", sorted(STRATEGY_PARAMS))
@pytest.mark.filterwarnings("ignore")
def test_every_strategy_merges_a_fused_kohya_and_a_split_diffusers_flux_lora(tmp_path, strategy, to):
    a, b = _flux_pair(tmp_path)
    out = tmp_path / f"{strategy}.safetensors"
    params = dict(STRATEGY_PARAMS[strategy])
    if strategy == "blocks" and to == "diffusers":
        params["take"] = "1:transformer.transformer_blocks,2:single_transformer_blocks"
    res = lora_merge.merge([a, b], out, strategy=strategy, params=params, rank=4, to=to)
    back = lora_merge.load(res.output)
    assert back.modules and set(back.modules) == set(res.adapter.modules)
    assert layout_of(back) == ("flux", "native" if to == "kohya" else "diffusers")
    for m in back:
        assert torch.isfinite(m.delta()).all()
    if strategy == "blocks":  # input 1's double blocks as they were; input 2 has single blocks only
        da = align(lora_merge.load(a), to)
        double = [m for m in back if "double_blocks" in m.name or ".transformer_blocks." in m.name]
        assert double
        for m in double:
            torch.testing.assert_close(m.delta(), da[m.name].delta(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- 4b. every strategy on every other DiT family
#: small configs of each family's diffusers class (built on the meta device: only the names and shapes)
SMALL_DIT = {
    "sd3": {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 24,
            "caption_projection_dim": 16, "pooled_projection_dim": 12},
    "flux2": {"num_layers": 2, "num_single_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
              "joint_attention_dim": 24, "in_channels": 16, "timestep_guidance_channels": 16,
              "axes_dims_rope": (2, 2, 2, 2)},
    "z-image": {"dim": 32, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 16,
                "axes_dims": [4, 6, 6], "axes_lens": [64, 32, 32]},
    "wan": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "text_dim": 16, "freq_dim": 16,
            "ffn_dim": 32},
    "qwen-image": {"num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 16,
                   "axes_dims_rope": (2, 2, 4)},
}
_BLOCK_RX = re.compile(r"^(transformer_blocks|blocks|layers)\.(\d+)\.")


def _family_pair(tmp_path, family):
    """Input 1 in the kohya dialect (the family's kohya layout: native/fused where it has one), input 2 in
    diffusers names; every Linear of blocks 0 and 1 (input 1) or block 1 (input 2), each with its own
    factors."""
    from lora_merge.formats import dit_arch

    model = dit_arch.meta_model(family, **SMALL_DIT[family])
    g = torch.Generator().manual_seed(5)
    ads = [lora_merge.Adapter(dialect="diffusers"), lora_merge.Adapter(dialect="diffusers")]
    for n, m in model.named_modules():
        hit = _BLOCK_RX.match(n)
        if not isinstance(m, torch.nn.Linear) or hit is None:
            continue
        for j, ad in enumerate(ads):
            if j == 1 and hit.group(2) != "1":
                continue
            r = 2 + j
            ad.modules["transformer." + n] = lora_merge.LoraModule.from_tensors(
                "transformer." + n, torch.randn(r, m.in_features, generator=g) / m.in_features**0.5,
                torch.randn(m.out_features, r, generator=g) * 0.1, alpha=float(r))
    a = lora_merge.save(ads[0], tmp_path / "a_kohya.safetensors", to="kohya")
    b = lora_merge.save(ads[1], tmp_path / "b_diffusers.safetensors", to="diffusers")
    return a, b, ads


@pytest.mark.parametrize("family", sorted(SMALL_DIT))
@pytest.mark.parametrize("strategy", sorted(STRATEGY_PARAMS))
@pytest.mark.filterwarnings("ignore")
def test_every_strategy_merges_each_dit_family_across_dialects(tmp_path, strategy, family):
    from lora_merge.formats.layout import layout_of
    from lora_merge.priors.table import LayerPriors, PriorRule

    a, b, ads = _family_pair(tmp_path, family)
    assert lora_merge.arch.guess_arch(lora_merge.load(a)) == family
    assert lora_merge.arch.guess_arch(lora_merge.load(b)) == family
    params = dict(STRATEGY_PARAMS[strategy])
    if strategy == "blocks":
        params["take"] = r"1:re:\.0\.,2:re:\.1\."
    if strategy == "duolora":  # a DiT has no resolution priors: a block table written as a priors file
        pri = LayerPriors([PriorRule("*.0.*", "content"), PriorRule("*.1.*", "style")], family, "test table")
        params["priors"] = str(pri.to_file(tmp_path / "priors.json"))
    res = lora_merge.merge([a, b], tmp_path / "m.safetensors", strategy=strategy, params=params,
                           rank=None if strategy == "linear" else 4, to="diffusers")
    back = lora_merge.load(res.output)
    assert layout_of(back) in (None, (family, "diffusers"))
    assert set(back.modules) == set(ads[0].modules)  # input 2's modules are a subset of input 1's
    for m in back:
        assert torch.isfinite(m.delta()).all()
    if strategy == "linear":  # exact: the dense sum in the diffusers layout
        for n, m in back.modules.items():
            want = ads[0][n].delta() + (ads[1][n].delta() if n in ads[1].modules else 0)
            torch.testing.assert_close(m.delta(), want, rtol=1e-5, atol=1e-6)
