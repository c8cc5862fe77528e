"""Inputs of different base models are refused with one line naming both;
an unknown architecture (a small partial LoRA) never causes a refusal by itself."""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule
from lora_merge.arch import arch_family
from lora_merge.errors import MergeError

SD_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
SD_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
GPT_ATTN = "transformer.h.0.attn.c_attn"


def make(names_dims, seed=0, r=2, config=None):
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="peft" if config else "kohya", config=config)
    for n, (d_out, d_in) in names_dims.items():
        ad.modules[n] = LoraModule.from_tensors(n, torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g))
    return ad


def sd(ctx, seed=0):
    return make({SD_K: (320, ctx), SD_Q: (320, 320)}, seed)


def gpt2():
    return make({"h.0.attn.c_attn": (2304, 768)}, config={"peft_type": "LORA", "base_model_name_or_path": "gpt2",
                                                         "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 2})


def test_gpt2_peft_and_sd15_unet_lora_are_refused():
    with pytest.raises(MergeError) as exc:
        lm.merge([gpt2(), sd(768)])
    msg = str(exc.value)
    assert "\n" not in msg and "gpt2" in msg and "Stable Diffusion 1.x" in msg


def test_sd1_and_sd2_are_named():
    with pytest.raises(MergeError, match=r"Stable Diffusion 1\.x.*Stable Diffusion 2\.x"):
        lm.merge([sd(768), sd(1024, 1)])
    with pytest.raises(MergeError, match=r"Stable Diffusion 1\.x.*Stable Diffusion XL"):
        lm.merge([sd(768), sd(2048, 1)])


def test_unknown_arch_is_not_refused():
    partial = make({SD_Q: (320, 320)}, 3)  # no cross-attention: SD 1.x or 2.x, the modules cannot tell
    assert arch_family(partial)[1] in (None, frozenset({"sd1", "sd2"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(lm.merge([sd(768), partial]).adapter) == 2
        assert len(lm.merge([sd(1024), partial]).adapter) == 2
        te = make({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}, 4)
        assert len(lm.merge([sd(768), te]).adapter) == 3


def test_allow_mixed_arch_overrides_and_is_recorded(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lm.merge([make({SD_Q: (320, 320)}), make({SD_Q: (320, 320), SD_K: (320, 1024)}, 1)],
                       allow_mixed_arch=True)
    assert "allow_mixed_arch" in res.report["recipe"]
    res = lm.merge([sd(768), sd(768, 1)])
    assert "allow_mixed_arch" not in res.report["recipe"]


def test_cli_refuses_with_one_line(tmp_path, capsys):
    from lora_merge.cli import main

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lm.save(sd(768), a, to="kohya")
    lm.save(sd(1024, 1), b, to="kohya")
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(a), str(b), "-o", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert exc.value.code != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Stable Diffusion 1.x" in lines[0] and "Stable Diffusion 2.x" in lines[0]
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(a), str(b), "-o", str(tmp_path / "m.safetensors"), "--allow-mixed-arch"])
    assert exc.value.code != 0 and "weight shape" in capsys.readouterr().err  # shapes still differ


def test_real_peft_and_sd15_fixtures_refused(sd15_fixture, peft_fixture):
    with pytest.raises(MergeError, match="Stable Diffusion 1.x"):
        lm.merge([peft_fixture("gpt2_tigrinya"), sd15_fixture("pokemon_style")])
