"""The dialect registry: the built-ins are Dialect objects, detection votes from the registry, and a new
dialect is one object and one register_dialect call (load/save/convert and --format/--to pick it up)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lora_merge
from lora_merge.adapter import Adapter, LoraModule, TensorRef
from lora_merge.cli import cli
from lora_merge.errors import FormatError, UsageError
from lora_merge.formats import (
    Dialect,
    Located,
    Written,
    detect_dialect,
    dialects,
    get_dialect,
    register_dialect,
    registered,
)
from lora_merge.formats import registry as reg
from lora_merge.formats.common import carried_metadata, cast, make_module


def _adapter() -> Adapter:
    g = torch.Generator().manual_seed(0)
    ad = Adapter(dialect="diffusers")
    for i in range(2):
        name = f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{'qk'[i]}"
        ad.modules[name] = LoraModule(name=name, down=TensorRef.from_tensor(torch.randn(2, 8, generator=g)),
                                      up=TensorRef.from_tensor(torch.randn(8, 2, generator=g)), alpha=4.0)
    return ad


WRITERS = [d.name for d in registered() if getattr(d, "writable", True)]


def test_builtins_in_order_and_protocol():
    assert dialects() == ("kohya", "diffusers", "peft", "comfyui", "lycoris", "xlabs")
    for d in registered():
        assert isinstance(d, Dialect) and get_dialect(d.name) is d
    assert get_dialect("peft").folder_files == ("adapter_model.safetensors", "adapter_config.json")


def test_every_writer_returns_written():
    ad = _adapter()
    for name in WRITERS:
        w = get_dialect(name).write(ad, None, {"k": "v"})
        assert isinstance(w, Written) and w.tensors and w.metadata["k"] == "v"
        assert set(w.files) == set(get_dialect(name).folder_files[1:])


def test_unknown_dialect_lists_the_choices():
    with pytest.raises(UsageError, match=re.escape("unknown format 'comfy' (choose from kohya, diffusers, peft, comfyui, lycoris, xlabs)")):
        get_dialect("comfy")
    with pytest.raises(UsageError, match="unknown output format"):
        lora_merge.save(_adapter(), "x.safetensors", to="comfy")


def test_detection_precedence_and_ties():
    # PEFT keys also parse as diffusers' lora_A/lora_B: the more specific dialect (lower precedence) wins
    assert detect_dialect(["base_model.model.a.lora_A.weight", "base_model.model.a.lora_B.weight"]) == "peft"
    # a tie goes to the first registered
    assert detect_dialect(["lora_unet_a_to_q.lora_down.weight", "unet.b.lora_A.weight"]) == "kohya"
    with pytest.raises(FormatError, match=r"not a kohya, diffusers, PEFT, ComfyUI, LyCORIS or XLabs LoRA file"):
        detect_dialect(["model.weight"])


class ToyDialect:
    """``toy.<module>.a`` / ``toy.<module>.b``; alpha = rank."""

    name = "toy"
    label = "toy"
    precedence = -1
    folder_files: tuple[str, ...] = ()
    keeps_extra_tensors = False

    def claims(self, key):
        return key.startswith("toy.")

    def locate(self, path):
        return None

    def read(self, refs, metadata, path, config=None):
        ad = Adapter(dialect="toy", metadata=dict(metadata))
        for key in refs:
            if key.endswith(".a"):
                mod = key[len("toy."):-2]
                ad.modules[mod] = make_module(mod, refs[key], refs[f"toy.{mod}.b"], path, key)
        return ad

    def write(self, adapter, dtype, metadata):
        tensors = {}
        for name, m in adapter.modules.items():
            tensors[f"toy.{name}.a"] = cast(m.down.load(), dtype)
            tensors[f"toy.{name}.b"] = cast(m.up.load(), dtype) * m.scale
        return Written(tensors, carried_metadata(adapter, metadata))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    return register_dialect(ToyDialect())


def test_a_new_dialect_is_one_object(toy, tmp_path):
    assert dialects()[-1] == "toy"
    with pytest.raises(ValueError, match="already registered"):
        register_dialect(ToyDialect())
    src = _adapter()
    out = lora_merge.save(src, tmp_path / "t.safetensors", to="toy")
    back = lora_merge.load(out)  # detected by its keys
    assert back.dialect == "toy" and set(back.modules) == set(src.modules)
    for name, m in src.modules.items():
        torch.testing.assert_close(back[name].delta(), m.delta(), rtol=0, atol=0)
    res = CliRunner().invoke(cli, ["convert", str(out), str(tmp_path / "k.safetensors"), "--to", "kohya",
                                   "--format", "toy"])
    assert res.exit_code == 0, res.output
    assert lora_merge.load(tmp_path / "k.safetensors").dialect == "kohya"


def test_register_refuses_a_non_dialect(monkeypatch):
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    with pytest.raises(TypeError, match="Dialect protocol"):
        register_dialect(object())  # type: ignore[arg-type]


def test_located_defaults():
    assert Located(Path("x")).certain is True and Located(Path("x")).config is None
