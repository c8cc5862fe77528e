"""Every real fixture reads; every fixture × every writer round-trips ΔW bit-exactly; save() safety."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import PEFT_DIRS, SD15_FILES, shared_fixture

import lora_merge
from lora_merge.adapter import Adapter, LoraModule
from lora_merge.errors import OutputExistsError, UsageError
from lora_merge.formats import detect_dialect, registered
from lora_merge.formats.safetensors_io import CheckedHandle

LAYOUT_KEYS = {"lora_adapter_metadata", "lora_merge.kohya_names", "format"}
ALL_FIXTURES = [f"sd15/{n}.safetensors" for n in SD15_FILES] + [f"peft/{n}" for n in PEFT_DIRS]


WRITERS = [d.name for d in registered() if getattr(d, "writable", True)]


def _save(adapter, path, to, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # modules_to_save dropped by kohya/diffusers: checked separately
        return lora_merge.save(adapter, path, to=to, **kw)


def _out(tmp_path, to, name="out"):
    return tmp_path / (name if to == "peft" else f"{name}.safetensors")


@pytest.mark.parametrize("name", SD15_FILES)
def test_sd15_fixtures_read(name):
    path = shared_fixture(f"sd15/{name}.safetensors")
    ad = lora_merge.load(path)
    assert ad.dialect == "diffusers"
    assert len(ad) == 128 and set(ad.ranks) == {4}
    assert all(m.scale == 1.0 and m.kind == "linear" for m in ad)
    assert all(n.startswith(("unet.down_blocks", "unet.up_blocks", "unet.mid_block")) for n in ad.modules)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0" in ad
    variant = "diffusers-attn-processor" if "style" in name else "diffusers-lora-compatible"
    assert ad.dialect_variant == variant
    # lazy: every tensor is backed by one shared handle on the file, nothing loaded yet
    handles = {id(r.handle) for m in ad for r in (m.down, m.up)}
    assert len(handles) == 1
    m = next(iter(ad))
    assert isinstance(m.down.handle, CheckedHandle)
    assert m.down.tensor is None and m.down.handle._handle is None


@pytest.mark.parametrize("name,scale,heads,fifo", [
    ("distilbert_emotion", 2.0, {"classifier": (6, 768), "pre_classifier": (768, 768)}, False),
    ("distilbert_imdb", 2.0, {"classifier": (2, 768), "pre_classifier": (768, 768)}, False),
    ("gpt2_tigrinya", 4.0, {}, True),
])
def test_peft_fixtures_read(name, scale, heads, fifo):
    ad = lora_merge.load(shared_fixture(f"peft/{name}"))
    assert ad.dialect == "peft" and ad.dialect_variant == "peft-folder"
    assert {m.scale for m in ad} == {scale} and set(ad.ranks) == {8}
    assert ad.config["fan_in_fan_out"] is fifo
    weights = {k.rsplit(".", 1)[0]: tuple(t.shape) for k, t in ad.extra_tensors.items()
               if k.endswith("weight")}
    assert weights == heads
    if name == "gpt2_tigrinya":
        m = ad["transformer.h.0.attn.c_attn"]
        assert (m.out_features, m.in_features) == (2304, 768)  # A r×in, B out×r even with fan_in_fan_out


def test_bare_peft_file_next_to_config_reads_config():
    path = shared_fixture("peft/distilbert_emotion") / "adapter_model.safetensors"
    ad = lora_merge.load(path)
    assert ad.dialect == "peft" and {m.scale for m in ad} == {2.0}


def test_bare_peft_file_without_config_warns(tmp_path):
    src = shared_fixture("peft/gpt2_tigrinya") / "adapter_model.safetensors"
    dst = tmp_path / "adapter_model.safetensors"
    dst.write_bytes(src.read_bytes())
    with pytest.warns(UserWarning, match="alpha = r"):
        ad = lora_merge.load(dst)
    assert ad.dialect_variant == "peft-bare" and {m.scale for m in ad} == {1.0}


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
@pytest.mark.parametrize("to", WRITERS)
def test_every_fixture_every_writer_roundtrips_exactly(tmp_path, fixture, to):
    if to == "comfyui" and fixture.startswith("peft/"):
        pytest.skip("the comfyui dialect holds diffusion models only")
    src = lora_merge.load(shared_fixture(fixture))
    out = _save(src, _out(tmp_path, to), to)
    back = lora_merge.load(out)
    assert back.dialect == to
    assert set(back.modules) == set(src.modules)
    for i, (name, m) in enumerate(src.modules.items()):
        b = back[name]
        assert (b.rank, b.kind, b.weight_shape) == (m.rank, m.kind, m.weight_shape)
        assert b.scale == m.scale, name
        # same factors and scale ⇒ the same ΔW bit for bit; dense ΔW checked on a sample (CPU budget)
        assert all(torch.equal(x, y) for x, y in zip(b.factors(), m.factors())), name
        if i % 16 == 0:
            assert torch.equal(b.delta(), m.delta()), name
    keep = {k: v for k, v in src.metadata.items() if k not in LAYOUT_KEYS}
    assert {k: back.metadata[k] for k in keep} == keep
    if to == "peft":
        assert set(back.extra_tensors) == set(src.extra_tensors)
        for k in src.extra_tensors:
            assert torch.equal(back.extra_tensors[k].load(), src.extra_tensors[k].load())
        if src.config:
            assert back.config["fan_in_fan_out"] == src.config["fan_in_fan_out"]
            assert back.config["base_model_name_or_path"] == src.config["base_model_name_or_path"]
            assert back.config["task_type"] == src.config["task_type"]


def test_non_peft_writer_warns_about_dropped_heads(tmp_path):
    ad = lora_merge.load(shared_fixture("peft/distilbert_imdb"))
    with pytest.warns(UserWarning, match="classifier.weight"):
        lora_merge.save(ad, tmp_path / "x.safetensors", to="diffusers")


def _synthetic(rule="standard", unet_only=False) -> Adapter:
    g = torch.Generator().manual_seed(1)
    ad = Adapter(dialect="diffusers", metadata={"ss_network_dim": "4", "note": "ünïcode"})
    specs = [("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (16, 8), 4, 3.0),
             ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", (16, 16), 2, None),
             ("unet.down_blocks.0.resnets.0.conv1", (8, 4, 3, 3), 3, 1.5),
             ("unet.up_blocks.1.attentions.0.proj_in", (8, 8, 1, 1), 4, 0.1),
             ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", (8, 8), 4, 7.0)]
    if unet_only:  # a PEFT folder holds one model's adapter
        specs = [x for x in specs if x[0].startswith("unet.")]
    for name, shape, r, alpha in specs:
        down = torch.randn((r, *shape[1:]), generator=g)
        up = torch.randn((shape[0], r, *([1, 1] if len(shape) == 4 else [])), generator=g)
        ad.modules[name] = LoraModule.from_tensors(name, down, up, alpha, rule)  # type: ignore[arg-type]
    return ad


@pytest.mark.parametrize("to", WRITERS)
@pytest.mark.parametrize("rule", ["standard", "rslora"])
def test_synthetic_mixed_ranks_alphas_conv(tmp_path, to, rule):
    src = _synthetic(rule, unet_only=to == "peft")
    out = lora_merge.save(src, _out(tmp_path, to), to=to, metadata={"extra": "yes"})
    back = lora_merge.load(out)
    assert back.metadata["extra"] == "yes" and back.metadata["note"] == "ünïcode"
    for name, m in src.modules.items():
        b = back[name]
        assert b.kind == m.kind and b.rank == m.rank
        exact = rule == "standard" or to not in ("kohya", "comfyui")  # no rsLoRA there: alpha·√r rounded once
        if exact:
            assert b.scale == m.scale and torch.equal(b.delta(), m.delta()), name
        else:
            assert math.isclose(b.scale, m.scale, rel_tol=1e-6)
            torch.testing.assert_close(b.delta(), m.delta(), rtol=1e-6, atol=1e-6)


def test_kohya_alpha_stored_per_module(tmp_path):
    from safetensors import safe_open

    out = lora_merge.save(_synthetic(), tmp_path / "k.safetensors", to="kohya")
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    assert a.shape == () and a.item() == 3.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in keys


def test_pipeline_lora_is_not_written_as_peft(tmp_path):
    """UNet + text-encoder modules in one PEFT folder would attach nowhere: refused, nothing written."""
    with pytest.raises(UsageError, match=r"to='peft': .*text_encoder and unet.*to='kohya'"):
        lora_merge.save(_synthetic(), tmp_path / "p", to="peft")
    assert list(tmp_path.iterdir()) == []


def test_peft_config_patterns(tmp_path):
    out = lora_merge.save(_synthetic(unet_only=True), tmp_path / "p", to="peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert any("to_out" in k and v == 2 for k, v in cfg["rank_pattern"].items())
    from peft import LoraConfig

    LoraConfig(**{k: v for k, v in cfg.items() if k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                                         "target_modules", "use_rslora")})


def test_dtype_cast(tmp_path):
    out = lora_merge.save(_synthetic(), tmp_path / "h.safetensors", to="kohya", dtype=torch.float16)
    back = lora_merge.load(out)
    assert {m.dtype for m in back} == {torch.float16}
    assert back["unet.down_blocks.0.resnets.0.conv1"].alpha == 1.5


def test_default_dialect_is_inputs(tmp_path):
    src = lora_merge.load(shared_fixture("sd15/course3_unet_prefixed.safetensors"))
    assert lora_merge.load(lora_merge.save(src, tmp_path / "o.safetensors")).dialect == "diffusers"
    src.dialect = None
    assert lora_merge.load(lora_merge.save(src, tmp_path / "p.safetensors")).dialect == "diffusers"


def test_refuses_existing_output_and_inputs(tmp_path):
    ad = _synthetic()
    out = lora_merge.save(ad, tmp_path / "a.safetensors", to="kohya")
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="exists"):
        lora_merge.save(ad, out, to="kohya")
    loaded = lora_merge.load(out)
    with pytest.raises(OutputExistsError, match="input"):
        lora_merge.save(loaded, out, to="kohya", force=True)
    assert out.read_bytes() == before
    lora_merge.save(ad, out, to="diffusers", force=True)
    assert lora_merge.load(out).dialect == "diffusers"


def test_refuses_writing_into_input_peft_folder(tmp_path):
    ad = lora_merge.load(lora_merge.save(_synthetic(unet_only=True), tmp_path / "p", to="peft"))
    with pytest.raises(OutputExistsError, match="input"):
        lora_merge.save(ad, tmp_path / "p", to="peft", force=True)
    with pytest.raises(OutputExistsError, match="input"):
        lora_merge.save(ad, tmp_path / "p" / "adapter_model.safetensors", to="diffusers", force=True)


def test_lazy_tensors_from_another_file_and_no_temp_left(tmp_path):
    src = lora_merge.load(shared_fixture("sd15/sd_lora_2100.safetensors"))
    out = lora_merge.convert(src.source, tmp_path / "k.safetensors", to="kohya")
    assert out.exists() and [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from lora_merge.formats import safetensors_io

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors_io, "_serialize", boom)
    with pytest.raises(KeyboardInterrupt):
        lora_merge.save(_synthetic(), tmp_path / "x.safetensors", to="kohya")
    assert list(tmp_path.iterdir()) == []


def test_save_is_byte_deterministic(tmp_path):
    """Same adapter + metadata → same bytes, whatever the metadata's insertion order."""
    ad = _synthetic()
    a = lora_merge.save(ad, tmp_path / "a.safetensors", to="kohya", metadata={"x": "1", "y": "2"})
    b = lora_merge.save(ad, tmp_path / "b.safetensors", to="kohya", metadata={"y": "2", "x": "1"})
    assert a.read_bytes() == b.read_bytes()


def test_save_usage_errors(tmp_path):
    ad = _synthetic()
    with pytest.raises(UsageError, match="unknown output format"):
        lora_merge.save(ad, tmp_path / "x.safetensors", to="comfy")
    with pytest.raises(UsageError, match="folder"):
        lora_merge.save(ad, tmp_path / "x.safetensors", to="peft")
    with pytest.raises(UsageError, match="strings"):
        lora_merge.save(ad, tmp_path / "x.safetensors", to="kohya", metadata={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(UsageError, match="does not exist"):
        lora_merge.save(ad, tmp_path / "nope" / "x.safetensors", to="kohya")


def test_convert_and_forced_format(tmp_path):
    p = shared_fixture("sd15/pokemon_style.safetensors")
    out = lora_merge.convert(p, tmp_path / "p", to="peft")
    ad = lora_merge.load(out, format="peft")
    assert len(ad) == 128
    with pytest.raises(lora_merge.FormatError, match="no kohya LoRA modules"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_merge.load(p, format="kohya")


def test_detect_dialect():
    assert detect_dialect(["lora_unet_x_to_q.lora_down.weight", "lora_unet_x_to_q.alpha"], {}) == "kohya"
    assert detect_dialect(["base_model.model.a.lora_A.weight"], {}) == "peft"
    assert detect_dialect(["unet.a.lora_A.weight", "unet.a.lora_B.weight"], {}) == "diffusers"
    assert detect_dialect(["a.processor.to_q_lora.down.weight"], {}) == "diffusers"
    with pytest.raises(lora_merge.FormatError, match="no LoRA keys"):
        detect_dialect(["model.weight"], {})
