"""The model path loads only safetensors weights from ``--base`` unless ``--allow-pickle``:
a diffusers folder whose UNet has only a ``.bin`` is refused by ``merge --mode model``,
``priors measure`` and ``calibrate`` before anything is unpickled (diffusers is not even imported)."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule
from lora_merge.cli import main
from lora_merge.errors import UsageError
from lora_merge.model_mode.base_model import load_base_model


@pytest.fixture
def pickle_pipeline(tmp_path):
    """A diffusers pipeline folder whose UNet weights are pickle only (the file is never read)."""
    root = tmp_path / "pipe"
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet" / "config.json").write_text("{}")
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read: refusing comes first")
    return root


@pytest.fixture
def loras(tmp_path):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(2):
        ad = Adapter(dialect="diffusers")
        n = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        ad.modules[n] = LoraModule.from_tensors(n, torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g))
        out.append(lm.save(ad, tmp_path / f"l{i}.safetensors"))
    (tmp_path / "imgs").mkdir()
    return out


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(list(map(str, argv)))
    return exc.value.code, capsys.readouterr().err


def test_load_base_model_refuses_pickle_only_weights(pickle_pipeline):
    before = set(sys.modules)
    with pytest.raises(UsageError, match=r"unet/ has only pickle weights.*allow_pickle=True"):
        load_base_model(str(pickle_pipeline))
    assert not any(m.startswith("diffusers") for m in set(sys.modules) - before)


@pytest.mark.parametrize("command", ["merge", "priors", "calibrate"])
def test_model_path_commands_refuse_pickle_base(tmp_path, capsys, pickle_pipeline, loras, command):
    imgs = tmp_path / "imgs"
    common = ["--content-images", imgs, "--content-prompt", "a sks dog", "--style-images", imgs,
              "--style-prompt", "zkz style"]
    argv = {
        "merge": ["merge", *loras, "-s", "ziplora", "--mode", "model", "--base", pickle_pipeline, *common,
                  "-o", tmp_path / "out.safetensors"],
        "priors": ["priors", "measure", *loras, "--base", pickle_pipeline, *common, "-o", tmp_path / "p.json"],
        "calibrate": ["calibrate", "--base", pickle_pipeline, *common, "-o", tmp_path / "stats.safetensors"],
    }[command]
    code, err = run(argv, capsys)
    assert code == 2 and "pickle" in err and "--allow-pickle" in err and err.strip().count("\n") == 0, err
    assert not any(p.name.startswith(("out", "p.json", "stats")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("command", ["priors", "calibrate"])
def test_output_paths_are_checked_before_the_base_model_loads(tmp_path, capsys, pickle_pipeline, loras, command):
    imgs = tmp_path / "imgs"
    common = ["--content-images", imgs, "--content-prompt", "a sks dog", "--style-images", imgs,
              "--style-prompt", "zkz style"]
    for out, want in ((tmp_path / "missing" / "o.json", "does not exist"), (loras[0], "input")):
        argv = (["priors", "measure", *loras, "--base", pickle_pipeline, *common, "-o", out, "--force"]
                if command == "priors" else
                ["calibrate", "--base", pickle_pipeline, *common, "--adapter", loras[0], "-o", out, "--force"])
        code, err = run(argv, capsys)
        assert code in (2, 4) and want in err and "pickle" not in err, err  # the path, not the model
