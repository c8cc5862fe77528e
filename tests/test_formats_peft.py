"""PEFT folders written by PEFT itself read with the exact per-module scale (rsLoRA, rank/alpha patterns,
fan_in_fan_out, modules_to_save), and what we write back is what PEFT loads."""
from __future__ import annotations

import json

import pytest
import torch

import lora_merge

peft = pytest.importorskip("peft")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8), "v": torch.nn.Linear(8, 6)}) for _ in range(2))
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b["q"](x)
        return self.head(self.blocks[-1]["v"](x))


def _peft_model(**cfg):
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=["q", "v"], init_lora_weights=False, **cfg)
    return peft.get_peft_model(Tiny(), config)


def _check_against_peft(pm, ad):
    from peft.tuners.lora import LoraLayer

    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules()
              if isinstance(m, LoraLayer)}
    assert set(layers) == set(ad.modules)
    for name, layer in layers.items():
        assert ad[name].scale == pytest.approx(layer.scaling["default"], rel=1e-15)
        torch.testing.assert_close(ad[name].delta(flat=False), layer.get_delta_weight("default"), rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("cfg", [
    {"r": 4, "lora_alpha": 8},
    {"r": 4, "lora_alpha": 8, "use_rslora": True},
    {"r": 4, "lora_alpha": 8, "rank_pattern": {"blocks.1.q": 2}, "alpha_pattern": {"v": 3}},
    {"r": 2, "lora_alpha": 5, "modules_to_save": ["head"]},
])
def test_reads_peft_save_pretrained_and_writes_it_back(tmp_path, cfg):
    pm = _peft_model(**cfg)
    pm.save_pretrained(tmp_path / "src")
    ad = lora_merge.load(tmp_path / "src")
    _check_against_peft(pm, ad)
    if cfg.get("use_rslora"):
        assert {m.scale_rule for m in ad} == {"rslora"}
    if "modules_to_save" in cfg:
        assert sorted(ad.extra_tensors) == ["head.bias", "head.weight"]
    out = lora_merge.save(ad, tmp_path / "ours", to="peft")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["use_rslora"] == bool(cfg.get("use_rslora"))
    fresh = peft.PeftModel.from_pretrained(Tiny(), str(out))
    _check_against_peft(fresh, ad)
    if "modules_to_save" in cfg:
        got = fresh.base_model.model.head.modules_to_save["default"].weight
        assert torch.equal(got, ad.extra_tensors["head.weight"].load())


def test_modules_to_save_default_prefix_form(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    from safetensors.torch import save_file

    save_file({"base_model.model.x.lora_A.weight": torch.randn(2, 4),
               "base_model.model.x.lora_B.weight": torch.randn(4, 2),
               "base_model.model.cls.modules_to_save.default.weight": torch.randn(3, 4)},
              d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 6,
                                                       "modules_to_save": ["cls"]}))
    ad = lora_merge.load(d)
    assert list(ad.extra_tensors) == ["cls.weight"] and ad["x"].scale == 3.0


def test_missing_lora_alpha_uses_peft_default(tmp_path):
    pm = _peft_model(r=4, lora_alpha=8)
    pm.save_pretrained(tmp_path / "src")
    cfg_path = tmp_path / "src" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["lora_alpha"]
    cfg_path.write_text(json.dumps(cfg))
    ad = lora_merge.load(tmp_path / "src")
    assert {m.scale for m in ad} == {2.0}  # LoraConfig's default lora_alpha = 8, r = 4
