"""LyCORIS LoHa / LoKr / full-diff files: ΔW against ``lycoris-lora``'s own functions, inspect, convert to a
LoRA of rank K with its error (and --max-error), merge, and bad shapes."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import lora_merge
from lora_merge.cli import main
from lora_merge.errors import FormatError
from lora_merge.formats.lycoris import LycorisModule, to_lora


def cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _loha(prefix, out, inp, r, g, tucker_k=None, alpha=None):
    if tucker_k:
        sd = {f"{prefix}.hada_w1_a": torch.randn(r, out, generator=g), f"{prefix}.hada_w1_b": torch.randn(r, inp, generator=g),
              f"{prefix}.hada_w2_a": torch.randn(r, out, generator=g), f"{prefix}.hada_w2_b": torch.randn(r, inp, generator=g),
              f"{prefix}.hada_t1": torch.randn(r, r, tucker_k, tucker_k, generator=g),
              f"{prefix}.hada_t2": torch.randn(r, r, tucker_k, tucker_k, generator=g)}
    else:
        sd = {f"{prefix}.hada_w1_a": torch.randn(out, r, generator=g), f"{prefix}.hada_w1_b": torch.randn(r, inp, generator=g),
              f"{prefix}.hada_w2_a": torch.randn(out, r, generator=g), f"{prefix}.hada_w2_b": torch.randn(r, inp, generator=g)}
    if alpha is not None:
        sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return sd


def _lokr(prefix, a, b, c, d, r, g, alpha=None, factor_w1=False, tucker_k=None):
    sd = {}
    if factor_w1:
        sd[f"{prefix}.lokr_w1_a"] = torch.randn(a, r, generator=g)
        sd[f"{prefix}.lokr_w1_b"] = torch.randn(r, b, generator=g)
    else:
        sd[f"{prefix}.lokr_w1"] = torch.randn(a, b, generator=g)
    if tucker_k:
        sd[f"{prefix}.lokr_w2_a"] = torch.randn(r, c, generator=g)
        sd[f"{prefix}.lokr_w2_b"] = torch.randn(r, d, generator=g)
        sd[f"{prefix}.lokr_t2"] = torch.randn(r, r, tucker_k, tucker_k, generator=g)
    else:
        sd[f"{prefix}.lokr_w2_a"] = torch.randn(c, r, generator=g)
        sd[f"{prefix}.lokr_w2_b"] = torch.randn(r, d, generator=g)
    if alpha is not None:
        sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return sd


def _file(tmp_path, sd, name="ly.safetensors"):
    p = tmp_path / name
    save_file(sd, str(p))
    return p


# ---------------------------------------------------------------- lycoris-lora as the oracle
def test_loha_and_lokr_delta_match_lycoris_lora(tmp_path):
    lyc_loha = pytest.importorskip("lycoris.functional.loha")
    lyc_lokr = pytest.importorskip("lycoris.functional.lokr")
    g = _g(1)
    sd = {}
    sd |= _loha("lora_unet_single_blocks_0_linear2", 24, 40, 4, g, alpha=2)
    sd |= _loha("lora_unet_down_blocks_0_resnets_0_conv1", 8, 6, 3, g, tucker_k=3, alpha=6)
    sd |= _lokr("lora_unet_double_blocks_0_img_attn_proj", 4, 8, 6, 5, 2, g, alpha=8)
    sd |= _lokr("lora_unet_double_blocks_1_img_attn_proj", 4, 8, 6, 5, 3, g, alpha=3, factor_w1=True)
    sd |= _lokr("lora_unet_down_blocks_0_resnets_1_conv1", 2, 3, 4, 2, 2, g, tucker_k=3)
    sd["lora_unet_double_blocks_2_img_attn_proj.diff"] = torch.randn(12, 7, generator=g)
    ad = lora_merge.load(_file(tmp_path, sd))
    assert ad.dialect == "lycoris" and not ad.unparsed_keys and len(ad) == 6
    m = {mm.source_key: mm for mm in ad}

    def t(k):
        return sd.get(k)

    p = "lora_unet_single_blocks_0_linear2"
    want = lyc_loha.diff_weight(t(f"{p}.hada_w1_b"), t(f"{p}.hada_w1_a"), t(f"{p}.hada_w2_b"), t(f"{p}.hada_w2_a"),
                                None, None, gamma=2 / 4, backend="torch")
    torch.testing.assert_close(m[p].delta(flat=False), want)
    p = "lora_unet_down_blocks_0_resnets_0_conv1"
    want = lyc_loha.diff_weight(t(f"{p}.hada_w1_b"), t(f"{p}.hada_w1_a"), t(f"{p}.hada_w2_b"), t(f"{p}.hada_w2_a"),
                                t(f"{p}.hada_t1"), t(f"{p}.hada_t2"), gamma=6 / 3, backend="torch")
    assert m[p].weight_shape == (8, 6, 3, 3) and m[p].kind == "conv"
    torch.testing.assert_close(m[p].delta(flat=False), want, rtol=1e-5, atol=1e-4)
    for p, alpha in (("lora_unet_double_blocks_0_img_attn_proj", 8), ("lora_unet_double_blocks_1_img_attn_proj", 3)):
        want = lyc_lokr.diff_weight(t(f"{p}.lokr_w1"), t(f"{p}.lokr_w1_a"), t(f"{p}.lokr_w1_b"), None,
                                    t(f"{p}.lokr_w2_a"), t(f"{p}.lokr_w2_b"), None, gamma=alpha, backend="torch")
        assert m[p].weight_shape == (24, 40)
        torch.testing.assert_close(m[p].delta(flat=False), want)
    p = "lora_unet_down_blocks_0_resnets_1_conv1"  # Tucker LoKr, no alpha: scale 1
    want = lyc_lokr.diff_weight(t(f"{p}.lokr_w1"), None, None, None, t(f"{p}.lokr_w2_a"), t(f"{p}.lokr_w2_b"),
                                t(f"{p}.lokr_t2"), gamma=sd[f"{p}.lokr_w2_a"].shape[1], backend="torch")
    torch.testing.assert_close(m[p].delta(flat=False), want, rtol=1e-5, atol=1e-4)
    p = "lora_unet_double_blocks_2_img_attn_proj"
    assert torch.equal(m[p].delta(), sd[f"{p}.diff"])
    # the factors hold ΔW exactly, to fp32 rounding (what strategies see): LoHa/LoKr linear modules by
    # their structure (rank r1·r2, b·r, ...), the others as ΔW·I
    for mm in ad:
        b, a = mm.factors()
        torch.testing.assert_close(mm.scale * (b @ a), mm.delta(), rtol=1e-5, atol=1e-5)
    ranks = {mm.source_key: mm.rank for mm in ad}
    assert ranks["lora_unet_single_blocks_0_linear2"] == 16  # LoHa 4·4 instead of 24
    assert ranks["lora_unet_double_blocks_1_img_attn_proj"] == 8 * 3  # LoKr b·r instead of 24


# ---------------------------------------------------------------- inspect, convert --rank, merge
def _flux_lokr(tmp_path):
    g = _g(2)
    sd = {}
    for i in range(2):
        sd |= _lokr(f"lora_unet_double_blocks_{i}_img_attn_proj", 4, 4, 8, 8, 2, g, alpha=4)
        sd |= _loha(f"lora_unet_single_blocks_{i}_linear2", 32, 32 * 5, 4, g, alpha=4)
    return _file(tmp_path, sd, "flux_lokr.safetensors")


def test_inspect_shows_lycoris_types(tmp_path, capsys):
    p = _flux_lokr(tmp_path)
    code, out, err = cli(["inspect", p, "--json"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["dialect"] == "lycoris" and "LoKr 2" in s["dialect_variant"] and "LoHa 2" in s["dialect_variant"]
    assert s["architecture"] == "flux"


def test_convert_to_rank_k_reports_error_and_max_error_guards(tmp_path, capsys):
    p = _flux_lokr(tmp_path)
    ad = lora_merge.load(p)
    lo, rep = to_lora(ad, 64)
    assert rep["rel_error_overall"] < 1e-5  # rank 64 holds these ΔW (rank ≤ 32)
    lo, rep = to_lora(ad, 4)
    assert 0 < rep["rel_error_overall"] < 1 and set(rep["per_module"]) == set(ad.modules)
    for m in ad:  # the truncated SVD is the best rank-4 approximation: its error is the tail of the spectrum
        s = torch.linalg.svdvals(m.delta())
        tail = float((s[4:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        assert rep["per_module"][m.name] == pytest.approx(tail, rel=1e-3, abs=1e-6)
    out = tmp_path / "lora.safetensors"
    code, _, err = cli(["convert", p, out, "--to", "kohya", "--rank", "4"], capsys)
    assert code == 0, err
    assert "relative ΔW error" in err
    back = lora_merge.load(out)
    assert back.dialect == "kohya" and {m.rank for m in back} == {4}
    for name, m in lo.modules.items():
        torch.testing.assert_close(back[name].delta(), m.delta())
    # without --rank: refused; with a too-small --max-error: refused; nothing written either way
    out2 = tmp_path / "lora2.safetensors"
    code, _, err = cli(["convert", p, out2, "--to", "kohya"], capsys)
    assert code != 0 and not out2.exists() and "--rank" in err.strip().splitlines()[-1]
    code, _, err = cli(["convert", p, out2, "--to", "diffusers", "--rank", "2", "--max-error", "0.01"], capsys)
    assert code != 0 and not out2.exists()
    line = err.strip().splitlines()[-1]
    assert "--max-error" in line and "flux_lokr.safetensors" in line


def test_merge_accepts_lycoris_via_exact_delta_and_refactors(tmp_path):
    p = _flux_lokr(tmp_path)
    ad = lora_merge.load(p)
    g = _g(3)
    lora = lora_merge.Adapter(dialect="kohya")
    for m in ad:
        o, i = m.weight_shape
        lora.modules[m.name] = lora_merge.LoraModule.from_tensors(m.name, torch.randn(2, i, generator=g),
                                                                  torch.randn(o, 2, generator=g))
    lp = lora_merge.save(lora, tmp_path / "lora.safetensors", to="kohya")
    res = lora_merge.merge([p, lp], tmp_path / "m.safetensors", weights=[1.0, 0.5], rank=40, to="kohya")
    out = lora_merge.load(res.output)
    for m in ad:
        want = m.delta() + 0.5 * lora[m.name].delta()
        torch.testing.assert_close(out[m.name].delta(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(lora_merge.errors.UsageError, match="rank="):
        lora_merge.merge([p, lp], tmp_path / "m2.safetensors")
    assert not (tmp_path / "m2.safetensors").exists()


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_inconsistent_shapes_are_one_line_errors(tmp_path, capsys, kind):
    g = _g(4)
    if kind == "loha":
        sd = _loha("lora_unet_double_blocks_0_img_attn_proj", 8, 8, 2, g)
        sd["lora_unet_double_blocks_0_img_attn_proj.hada_w2_b"] = torch.randn(2, 9, generator=g)
    else:
        sd = _lokr("lora_unet_double_blocks_0_img_attn_proj", 2, 2, 4, 4, 2, g)
        sd["lora_unet_double_blocks_0_img_attn_proj.lokr_w2_b"] = torch.randn(3, 4, generator=g)
    p = _file(tmp_path, sd, "bad.safetensors")
    with pytest.raises(FormatError, match="lora_unet_double_blocks_0_img_attn_proj"):
        lora_merge.load(p)
    out = tmp_path / "o.safetensors"
    code, _, err = cli(["convert", p, out, "--to", "kohya", "--rank", "2"], capsys)
    line = err.strip().splitlines()[-1]
    assert code != 0 and not out.exists() and len(err.strip().splitlines()) == 1
    assert "bad.safetensors" in line and "lora_unet_double_blocks_0_img_attn_proj" in line


def test_dora_is_refused_with_the_reason(tmp_path):
    g = _g(5)
    sd = {"lora_unet_a_to_q.lora_down.weight": torch.randn(2, 4, generator=g),
          "lora_unet_a_to_q.lora_up.weight": torch.randn(4, 2, generator=g),
          "lora_unet_a_to_q.dora_scale": torch.randn(1, 4, generator=g)}
    p = _file(tmp_path, sd, "dora.safetensors")
    with pytest.raises(lora_merge.errors.UnsupportedAdapterError, match="base model"):
        lora_merge.load(p)


def test_lycoris_module_is_a_lora_module_with_exact_factors():
    assert issubclass(LycorisModule, lora_merge.LoraModule)


def test_diff_shows_lycoris_against_its_lora_conversion(tmp_path, capsys):
    p = _flux_lokr(tmp_path)
    out = tmp_path / "lora.safetensors"
    code, _, err = cli(["convert", p, out, "--to", "comfyui", "--rank", "6"], capsys)
    assert code == 0, err
    _, rep = to_lora(lora_merge.load(p), 6)
    code, o, err = cli(["diff", p, out, "--json"], capsys)
    assert code == 0, err
    d = json.loads(o)
    assert not d["only_in_a"] and not d["only_in_b"]
    rows = {r["name"]: r["rel_diff"] for r in d["modules"]}
    for name, e in rep["per_module"].items():
        assert rows[name] == pytest.approx(e, rel=1e-3, abs=1e-5)


# ---------------------------------------------------------------- DoRA with the base weights
def test_peft_dora_is_exact_with_base_weights(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(8, 6, bias=False))
    w0 = base.lin.weight.detach().clone()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], use_dora=True, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "magnitude" in n:
                p.mul_(1.5)
    folder = tmp_path / "dora"
    model.save_pretrained(folder)
    want = model.merge_and_unload().lin.weight.detach() - w0
    bw = tmp_path / "base.safetensors"
    save_file({"lin.weight": w0}, str(bw))
    with pytest.raises(lora_merge.errors.UnsupportedAdapterError, match="base model"):
        lora_merge.load(folder)
    ad = lora_merge.load(folder, base_weights=bw)
    assert ad["lin"].lycoris_type == "DoRA" and not ad.unparsed_keys
    torch.testing.assert_close(ad["lin"].delta(), want, rtol=1e-5, atol=1e-6)
    out = tmp_path / "lora.safetensors"
    code, _, err = cli(["convert", folder, out, "--to", "diffusers", "--rank", "6", "--base-weights", bw], capsys)
    assert code == 0, err
    torch.testing.assert_close(lora_merge.load(out)["lin"].delta(), want, rtol=1e-4, atol=1e-5)


def test_kohya_dora_scale_per_input_column(tmp_path):
    g = _g(6)
    a, b, w, mag = torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), torch.randn(4, 5, generator=g), \
        torch.rand(1, 5, generator=g) + 0.5
    p = _file(tmp_path, {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": a,
                         "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": b,
                         "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(4.0),
                         "lora_unet_double_blocks_0_img_attn_proj.dora_scale": mag}, "dora.safetensors")
    bw = _file(tmp_path, {"double_blocks.0.img_attn_proj.weight": w}, "bad_base.safetensors")
    with pytest.raises(FormatError, match="no base weight"):
        lora_merge.load(p, base_weights=bw)
    bw = _file(tmp_path, {"double_blocks.0.img_attn.proj.weight": w}, "base.safetensors")
    ad = lora_merge.load(p, base_weights=bw)
    new = w + 2.0 * b @ a
    want = mag * new / new.norm(dim=0, keepdim=True) - w
    torch.testing.assert_close(ad["transformer.double_blocks.0.img_attn.proj"].delta(), want)
