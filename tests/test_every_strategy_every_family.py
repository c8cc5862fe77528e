"""Every registered strategy on every DiT family: a fused kohya × split diffusers FLUX.1 pair (each
output dialect), a kohya-dialect × diffusers pair of SD3, FLUX.2, Z-Image, Wan and Qwen-Image (``linear``
checked against the dense sum), and DuoLoRA on a DiT, which needs a block-role priors table (the Flux
``flux-splitflux`` table, or a priors file)."""
from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import cli_result as cli
from conftest import save_tensors as _file

import lora_merge
from lora_merge.formats.layout import align, layout_of

H = 16


# ---------------------------------------------------------------- DuoLoRA on a DiT family
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


# ---------------------------------------------------------------- every strategy on a Flux pair
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


# ---------------------------------------------------------------- every strategy on every other DiT family
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
