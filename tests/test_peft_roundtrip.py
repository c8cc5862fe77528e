"""PEFT → kohya/diffusers → PEFT restores the adapter: the config fields travel in
the file's metadata and the classification head with keep_heads, so the restored adapter's logits on a tiny
GPT-2 with a classification head (built from a config) equal the original's; a hop that drops the head warns."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lora_merge as lm

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = {"vocab_size": 64, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 4, "num_labels": 3, "pad_token_id": 0}


def _base():
    torch.manual_seed(0)
    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**CFG)).eval()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft") / "orig"
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                          fan_in_fan_out=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_base(), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.normal_()
    model.save_pretrained(str(folder))
    return folder


def _logits(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(_base(), str(folder)).eval()
    ids = torch.tensor([[5, 9, 13, 2, 7, 1]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("via", ["kohya", "diffusers"])
def test_peft_single_file_peft_round_trip_restores_logits(tmp_path, original, via):
    mid = tmp_path / f"mid_{via}.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing is dropped: no warning
        lm.convert(original, mid, to=via, keep_heads=True)
        back = lm.convert(mid, tmp_path / "back", to="peft")
    cfg = json.loads((back / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["fan_in_fan_out"] is True
    assert cfg["modules_to_save"] and "score" in " ".join(cfg["modules_to_save"])
    want, got = _logits(original), _logits(back)
    base = _base()(input_ids=torch.tensor([[5, 9, 13, 2, 7, 1]])).logits
    assert not torch.allclose(want, base)  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dropping_the_head_warns_at_every_hop(tmp_path, original):
    with pytest.warns(UserWarning, match="modules_to_save.*--keep-heads"):
        lm.convert(original, tmp_path / "k.safetensors", to="kohya")
    k2 = lm.convert(original, tmp_path / "k2.safetensors", to="kohya", keep_heads=True)
    with pytest.warns(UserWarning, match="modules_to_save"):  # the second hop would drop it again
        lm.convert(k2, tmp_path / "d.safetensors", to="diffusers")
    assert "score.weight" in " ".join(lm.load(k2).extra_tensors)
