"""diff_adapters against dense float64 references (in-memory adapters), and the real fixtures."""
from __future__ import annotations

import math

import pytest
import torch

from lora_merge.adapter import Adapter, LoraModule
from lora_merge.analysis.diff import diff_adapters, exceeds, extra_tensors_differ

NAMES = [
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
    "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
]


def _module(name, d_out, d_in, r, alpha=None, gen=None, rslora=False):
    down = torch.randn(r, d_in, generator=gen)
    up = torch.randn(d_out, r, generator=gen)
    return LoraModule.from_tensors(name, down, up, alpha, "rslora" if rslora else "standard")


def _adapter(mods):
    return Adapter(modules={m.name: m for m in mods}, dialect="diffusers")


def _dense(m: LoraModule) -> torch.Tensor:
    b = m.up.load(torch.float64).reshape(m.out_features, m.rank)
    a = m.down.load(torch.float64).reshape(m.rank, -1)
    return m.scale * (b @ a)


def _pair():
    g = torch.Generator().manual_seed(1)
    a = _adapter([
        _module(NAMES[0], 40, 32, 4, alpha=8.0, gen=g),
        _module(NAMES[1], 40, 24, 4, gen=g),
        _module(NAMES[2], 48, 48, 8, alpha=4.0, gen=g),
        _module(NAMES[3], 40, 40, 4, gen=g),
    ])
    b = _adapter([
        _module(NAMES[0], 40, 32, 6, alpha=3.0, gen=g),  # rank and alpha change
        _module(NAMES[1], 40, 24, 4, gen=g, rslora=True),
        _module(NAMES[2], 48, 48, 8, alpha=4.0, gen=g),
        _module("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 20, 20, 2, gen=g),
    ])
    return a, b


def test_diff_matches_dense_reference():
    a, b = _pair()
    res = diff_adapters(a, b, top=2)
    assert [m["name"] for m in res["only_in_a"]] == [NAMES[3]]
    assert [m["name"] for m in res["only_in_b"]] == ["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert res["only_in_a"][0]["norm"] == pytest.approx(float(_dense(a[NAMES[3]]).norm()), rel=1e-9)
    assert res["num_common"] == 3
    changed = {c["name"]: c["changed"] for c in res["changes"]}
    assert changed == {NAMES[0]: ["rank", "alpha"]}
    for row in res["modules"]:
        da, db = _dense(a[row["name"]]), _dense(b[row["name"]])
        na, nb = float(da.norm()), float(db.norm())
        assert row["norm_a"] == pytest.approx(na, rel=1e-9)
        assert row["norm_b"] == pytest.approx(nb, rel=1e-9)
        assert row["rel_diff"] == pytest.approx(float((da - db).norm()) / na, rel=1e-9)
        assert row["cosine"] == pytest.approx(float((da * db).sum()) / (na * nb), rel=1e-9, abs=1e-12)
        assert row["norm_ratio"] == pytest.approx(nb / na, rel=1e-9)
        # column-space overlap from a dense SVD of each ΔW (reference only)
        ua = torch.linalg.svd(da, full_matrices=False)[0][:, : a[row["name"]].rank]
        ub = torch.linalg.svd(db, full_matrices=False)[0][:, : b[row["name"]].rank]
        cos = torch.linalg.svdvals(ua.T @ ub)
        k = min(ua.shape[1], ub.shape[1])
        assert row["overlap"] == pytest.approx(float((cos[:k] ** 2).sum()) / k, rel=1e-6)
        assert row["min_cosine"] == pytest.approx(float(cos[:k].min()), abs=1e-6)
        assert 0.0 <= row["overlap"] <= 1.0
    # block and total aggregates treat the modules as one long vector
    blk = {r["block"]: r for r in res["blocks"]}
    key = "unet.down_blocks.1.attentions.0"
    das = torch.cat([_dense(a[n]).flatten() for n in NAMES[:2]])
    dbs = torch.cat([_dense(b[n]).flatten() for n in NAMES[:2]])
    assert blk[key]["modules"] == 2
    assert blk[key]["rel_diff"] == pytest.approx(float((das - dbs).norm() / das.norm()), rel=1e-9)
    assert blk[key]["cosine"] == pytest.approx(float((das * dbs).sum() / (das.norm() * dbs.norm())), rel=1e-9)
    assert res["total"]["modules"] == 3
    assert res["max_rel_diff"] == max(r["rel_diff"] for r in res["modules"])
    assert [r["name"] for r in res["top"]] == [
        r["name"] for r in sorted(res["modules"], key=lambda r: -r["rel_diff"])[:2]
    ]
    assert exceeds(res, 1e9)  # modules on one side only always fail


def test_identical_adapters_in_two_factorizations_diff_to_zero():
    """Same ΔW stored with a different alpha/scale split and permuted rank columns: ~0 difference."""
    g = torch.Generator().manual_seed(2)
    ref = _module(NAMES[0], 320, 768, 8, alpha=16.0, gen=g)
    b, a = ref.factors()
    perm = torch.randperm(8, generator=g)
    # alpha = r (scale 1) with the scale folded into B; rank components reordered
    other = LoraModule.from_tensors(NAMES[0], a[perm].clone(), (b * 2.0)[:, perm].clone(), None)
    res = diff_adapters(_adapter([ref]), _adapter([other]))
    row = res["modules"][0]
    assert row["rel_diff"] < 1e-6
    assert row["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert row["overlap"] == pytest.approx(1.0, abs=1e-6)
    assert res["max_rel_diff"] < 1e-6
    assert not exceeds(res, 1e-4)
    assert res["changes"] == [{"name": NAMES[0], "changed": ["alpha"], "rank_a": 8, "rank_b": 8,
                               "alpha_a": 16.0, "alpha_b": 8.0, "shape_a": [320, 768], "shape_b": [320, 768]}]


def test_small_difference_is_accurate_despite_cancellation():
    """A 1e-5 relative perturbation: the Gram formula alone would cancel; the core path must not."""
    g = torch.Generator().manual_seed(3)
    m = _module(NAMES[0], 64, 96, 4, gen=g)
    b, a = m.factors()
    b2 = b.double() + 1e-5 * torch.randn(b.shape, generator=g, dtype=torch.float64) * b.abs().mean()
    m2 = LoraModule.from_tensors(NAMES[0], a.double(), b2)
    res = diff_adapters(_adapter([m]), _adapter([m2]))
    ref = float((_dense(m) - _dense(m2)).norm() / _dense(m).norm())
    assert 1e-7 < ref < 1e-4
    assert res["modules"][0]["rel_diff"] == pytest.approx(ref, rel=1e-6)


def test_shape_change_and_zero_module():
    g = torch.Generator().manual_seed(4)
    a = _adapter([_module(NAMES[0], 16, 16, 2, gen=g),
                  LoraModule.from_tensors(NAMES[1], torch.zeros(2, 8), torch.zeros(8, 2))])
    b = _adapter([_module(NAMES[0], 16, 12, 2, gen=g), _module(NAMES[1], 8, 8, 2, gen=g)])
    res = diff_adapters(a, b)
    rows = {r["name"]: r for r in res["modules"]}
    assert rows[NAMES[0]]["comparable"] is False and rows[NAMES[0]]["rel_diff"] is None
    assert {"name": NAMES[0], "changed": ["shape"]}.items() <= res["changes"][0].items()
    assert rows[NAMES[1]]["norm_a"] == 0.0 and math.isinf(rows[NAMES[1]]["rel_diff"])
    assert rows[NAMES[1]]["overlap"] is None
    assert math.isinf(res["max_rel_diff"])
    assert exceeds(res, 1e9)


def test_extra_tensors_compared():
    g = torch.Generator().manual_seed(5)
    m = _module(NAMES[0], 8, 8, 2, gen=g)
    a, b = _adapter([m]), _adapter([m])
    head = torch.randn(6, 8, generator=g)
    a.extra_tensors["classifier.weight"] = type(m.down).from_tensor(head)
    b.extra_tensors["classifier.weight"] = type(m.down).from_tensor(head * 1.5)
    b.extra_tensors["score.weight"] = type(m.down).from_tensor(head)
    res = diff_adapters(a, b)
    assert res["extra_tensors"]["only_in_b"] == ["score.weight"]
    assert res["extra_tensors"]["common"][0]["rel_diff"] == pytest.approx(0.5, rel=1e-6)
    assert res["extra_tensors"]["max_rel_diff"] == pytest.approx(0.5, rel=1e-6)
    # heads are reported but do not fail --fail-above (kohya/diffusers cannot hold them)
    assert res["max_rel_diff"] < 1e-12 and not exceeds(res, 1e-4)
    assert extra_tensors_differ(res, 10.0)  # a head on one side only
    b.extra_tensors.pop("score.weight")
    assert not extra_tensors_differ(diff_adapters(a, b), 0.6)


def test_sd15_fixtures_differ_sensibly(sd15_fixture):
    lm = pytest.importorskip("lora_merge")
    if not hasattr(lm, "load"):
        pytest.skip("lora_merge.load not available yet")
    a = lm.load(sd15_fixture("pokemon_style"))
    b = lm.load(sd15_fixture("rick_and_morty_style"))
    res = diff_adapters(a, b, top=5)
    assert res["num_common"] == 128 and not res["only_in_a"] and not res["only_in_b"]
    # spot-check the reported numbers against dense float64 ΔW for a few modules
    for row in res["modules"][::32]:
        da, db = _dense(a[row["name"]]), _dense(b[row["name"]])
        assert row["rel_diff"] == pytest.approx(float((da - db).norm() / da.norm()), rel=1e-6)
        assert row["cosine"] == pytest.approx(float((da * db).sum() / (da.norm() * db.norm())), rel=1e-6, abs=1e-9)
    assert len(res["top"]) == 5
    assert res["max_rel_diff"] > 0.1  # two different trainings are not near each other


def test_diff_never_svds_a_dense_delta(monkeypatch):
    seen = []
    real_svd, real_svdvals = torch.linalg.svd, torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svd", lambda x, *a, **k: seen.append(tuple(x.shape)) or real_svd(x, *a, **k))
    monkeypatch.setattr(torch.linalg, "svdvals",
                        lambda x, *a, **k: seen.append(tuple(x.shape)) or real_svdvals(x, *a, **k))
    a, b = _pair()
    diff_adapters(a, b)
    assert seen and max(max(s) for s in seen) <= 8  # at most the larger rank
