"""summarize(): header facts, typed metadata, per-module stats from factors, and the real fixtures."""
from __future__ import annotations

import io
import json

import pytest
import torch

from lora_merge.adapter import Adapter, LoraModule, TensorRef
from lora_merge.analysis.inspection import parse_kohya_value, split_metadata, summarize

Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
K2 = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
MID = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v"
TE = "text_encoder.text_model.encoder.layers.3.self_attn.q_proj"
CONV = "unet.up_blocks.0.resnets.1.conv1"


class _NoRead:
    """A file handle that fails the test if any tensor data is read."""

    def get(self, key):
        raise AssertionError(f"tensor {key} was read; inspect without --modules must be header-only")


def _lazy(shape, dtype=torch.float16):
    return TensorRef(shape=tuple(shape), dtype=dtype, key="k", handle=_NoRead())


def _adapter():
    mods = [
        LoraModule(Q, _lazy((4, 640)), _lazy((640, 4)), alpha=2.0),
        LoraModule(K2, _lazy((8, 768)), _lazy((640, 8)), alpha=8.0),
        LoraModule(MID, _lazy((8, 1280)), _lazy((1280, 8)), alpha=4.0),
        LoraModule(TE, _lazy((4, 768)), _lazy((768, 4))),
        LoraModule(CONV, _lazy((4, 1280, 3, 3)), _lazy((1280, 4, 1, 1)), alpha=1.0),
    ]
    md = {
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_v2": "False",
        "ss_seed": "None",
        "ss_sd_model_hash": "12345678",
        "ss_tag_frequency": '{"img": {"cat": 3}}',
        "ss_output_name": "my_lora",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": "Test",
        "lora_merge.recipe": '{"strategy": "linear", "inputs": [{"path": "a.safetensors", "weight": 0.5}]}',
        "format": "pt",
    }
    return Adapter(modules={m.name: m for m in mods}, metadata=md, dialect="kohya", dialect_variant="kohya-diffusers")


def test_summary_is_header_only_and_counts():
    s = summarize(_adapter())
    assert s["num_modules"] == 5
    assert s["components"] == {"text_encoder": 1, "unet": 4}
    assert s["kinds"] == {"conv": 1, "linear": 4}
    assert s["architecture"] == "sd1"  # attn2.to_k reads a 768-d context
    blocks = {b["block"]: b for b in s["blocks"]}
    assert blocks["unet.down_blocks.1.attentions.0"]["modules"] == 2
    assert blocks["unet.down_blocks.1.attentions.0"]["ranks"] == [4, 8]
    assert blocks["unet.up_blocks.0.resnets.1"]["kinds"] == ["conv"]
    assert [b["block"] for b in s["blocks"]][:3] == [
        "unet.down_blocks.1.attentions.0", "unet.mid_block.attentions.0", "unet.up_blocks.0.resnets.1"]
    assert s["ranks"]["mixed"] and s["ranks"]["histogram"] == [{"value": 4, "count": 3}, {"value": 8, "count": 2}]
    assert s["alphas"]["histogram"] == [{"value": 1, "count": 1}, {"value": 2, "count": 1},
                                        {"value": 4, "count": 2}, {"value": 8, "count": 1}]
    assert s["alphas"]["stored"] is True
    assert sorted(e["value"] for e in s["scales"]["histogram"]) == [0.25, 0.5, 1.0]
    assert s["dtypes"] == {"float16": 10}
    expected = 4 * 640 * 2 + 8 * (768 + 640) + 8 * 1280 * 2 + 4 * 768 * 2 + 4 * 1280 * 9 + 1280 * 4
    assert s["num_params"] == expected
    json.dumps(s)  # JSON-able as is


def test_metadata_typed():
    md = split_metadata(_adapter().metadata)
    k = md["kohya"]
    assert k["ss_network_dim"] == 8 and isinstance(k["ss_network_dim"], int)
    assert k["ss_network_alpha"] == 4.0
    assert k["ss_v2"] is False and k["ss_seed"] is None
    assert k["ss_sd_model_hash"] == "12345678"  # a hash stays a string
    assert k["ss_tag_frequency"] == {"img": {"cat": 3}}
    assert k["ss_output_name"] == "my_lora"
    assert md["modelspec"]["modelspec.title"] == "Test"
    assert md["recipe"]["strategy"] == "linear"
    assert md["other"] == {"format": "pt"}
    assert split_metadata({"lora_merge.recipe": "{broken"})["recipe_error"].startswith("recipe is not valid JSON")
    assert parse_kohya_value("ss_lr", "1e-4") == pytest.approx(1e-4)
    assert parse_kohya_value("ss_note", "nan") == "nan"


def test_modules_stats_from_factors_match_dense():
    g = torch.Generator().manual_seed(0)
    mods = [
        LoraModule.from_tensors(Q, torch.randn(6, 40, generator=g), torch.randn(32, 6, generator=g), alpha=3.0),
        LoraModule.from_tensors(CONV, torch.randn(4, 8, 3, 3, generator=g), torch.randn(16, 4, 1, 1, generator=g)),
        LoraModule.from_tensors(TE, torch.randn(4, 24, generator=g), torch.zeros(24, 4)),
        LoraModule.from_tensors(MID, torch.randn(4, 24, generator=g), torch.randn(24, 4, generator=g), alpha=8.0,
                                scale_rule="rslora"),
    ]
    s = summarize(Adapter(modules={m.name: m for m in mods}), modules=True)
    rows = {r["name"]: r for r in s["modules"]}
    for m in mods:
        dense = m.delta(torch.float64)
        sv = torch.linalg.svdvals(dense)
        sv = sv[sv > sv.max() * 1e-9] if sv.max() > 0 else sv[:0]
        p = sv / sv.sum() if sv.numel() else sv
        eff = float(torch.exp(-(p * p.log()).sum())) if sv.numel() else 0.0
        row = rows[m.name]
        assert row["norm"] == pytest.approx(float(dense.norm()), rel=1e-5, abs=1e-9)
        assert row["effective_rank"] == pytest.approx(eff, rel=1e-4, abs=1e-9)
        assert row["rank"] == m.rank and row["shape"] == list(m.weight_shape)
    assert rows[MID]["scale"] == pytest.approx(8.0 / 2.0)  # rsLoRA: alpha / sqrt(r)
    assert s["scale_rules"] == {"standard": 3, "rslora": 1}
    assert rows[TE]["norm"] == 0.0 and rows[TE]["effective_rank"] == 0.0


def test_render_tables_for_people():
    from rich.console import Console

    from lora_merge.cli.inspect_cmd import render

    buf = io.StringIO()
    g = torch.Generator().manual_seed(0)
    ad = _adapter()
    ad.modules[Q] = LoraModule.from_tensors(Q, torch.randn(4, 640, generator=g), torch.randn(640, 4, generator=g))
    s = summarize(Adapter(modules={Q: ad.modules[Q]}, metadata=ad.metadata), modules=True)
    render(s, Console(file=buf, width=200))
    render(summarize(_adapter()), Console(file=buf, width=200))
    out = buf.getvalue()
    for text in ("dialect", "modules per block", "rank histogram", "ss_network_dim", "merge recipe", "‖ΔW‖_F",
                 "unet.down_blocks.1.attentions.0"):
        assert text in out


# ---- the real fixtures ----

def _load(path):
    lm = pytest.importorskip("lora_merge")
    if not hasattr(lm, "load"):
        pytest.skip("lora_merge.load not available yet")
    return lm.load(path)


@pytest.mark.parametrize("name", ["pokemon_style", "rick_and_morty_style", "course3_unet_prefixed", "sd_lora_2100"])
def test_sd15_fixture_summary(sd15_fixture, name):
    path = sd15_fixture(name)
    s = summarize(_load(path))
    assert s["num_modules"] == 128
    assert s["ranks"]["histogram"] == [{"value": 4, "count": 128}]
    assert s["scales"]["histogram"] == [{"value": 1.0, "count": 128}]
    assert s["alphas"]["stored"] is False
    assert s["components"] == {"unet": 128}
    assert s["architecture"] == "sd1"
    assert s["dtypes"] == {"float32": 256}
    assert s["file_size"] == path.stat().st_size
    assert sum(b["modules"] for b in s["blocks"]) == 128
    assert len(s["blocks"]) == 16  # 16 attention sub-blocks in the SD 1.x UNet
    json.dumps(s)


@pytest.mark.parametrize("name,scale,fifo,heads", [
    ("distilbert_emotion", 2.0, False, ["pre_classifier", "classifier", "score"]),
    ("distilbert_imdb", 2.0, False, ["classifier", "score"]),
    ("gpt2_tigrinya", 4.0, True, None),
])
def test_peft_fixture_summary(peft_fixture, name, scale, fifo, heads):
    s = summarize(_load(peft_fixture(name)))
    assert s["dialect"] == "peft"
    assert s["scales"]["histogram"] == [{"value": scale, "count": s["num_modules"]}]
    assert s["fan_in_fan_out"] is fifo
    assert s["modules_to_save"] == heads
    base = "gpt2" if name.startswith("gpt2") else "distilbert-base-uncased"
    assert s["architecture"] == base
    if heads:
        n_cls = 6 if name == "distilbert_emotion" else 2
        cls = [e for e in s["extra_tensors"] if e["name"].endswith("classifier.weight")
               and "pre_classifier" not in e["name"]]
        assert cls and cls[0]["shape"] == [n_cls, 768]
    else:
        assert s["extra_tensors"] == []
    assert s["num_modules"] == (36 if name.startswith("gpt2") else 12)


def test_modules_stats_never_svd_a_dense_delta(monkeypatch):
    """‖ΔW‖ and effective rank come from the r×r core: no SVD sees a matrix larger than the rank."""
    seen = []
    real_svd, real_svdvals = torch.linalg.svd, torch.linalg.svdvals

    def svd(x, *a, **k):
        seen.append(tuple(x.shape))
        return real_svd(x, *a, **k)

    def svdvals(x, *a, **k):
        seen.append(tuple(x.shape))
        return real_svdvals(x, *a, **k)

    real_eigh = torch.linalg.eigh

    def eigh(x, *a, **k):  # linalg.core_svd's Gram route decomposes the r×r Gram core instead
        seen.append(tuple(x.shape))
        return real_eigh(x, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setattr(torch.linalg, "svdvals", svdvals)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    g = torch.Generator().manual_seed(1)
    m = LoraModule.from_tensors(Q, torch.randn(4, 320, generator=g), torch.randn(640, 4, generator=g))
    row = summarize(Adapter(modules={Q: m}), modules=True)["modules"][0]
    assert row["norm"] > 0 and seen and max(max(s) for s in seen) <= 4
