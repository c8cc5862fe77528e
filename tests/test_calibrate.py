"""``lora-merge calibrate``: per-layer input second moments recorded from the base UNet."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from lora_merge.errors import UsageError
from lora_merge.input_models import load_stats
from lora_merge.masks import Concept, References
from lora_merge.model_mode.base_model import register_base_model
from lora_merge.model_mode.calibrate import calibrate, record_moments, select_layers
from lora_merge.model_mode.tiny import random_lora, tiny_base_model

ATTN2_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
ATTN1_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def base():
    return tiny_base_model(seed=0)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(3, 3, 8, 8, generator=g) * 2 - 1


def test_select_layers(base):
    names = select_layers(base.unet)
    assert len(names) == 32 and all(n.startswith("unet.") for n in names)
    assert select_layers(base.unet, pattern="attn2") == [n for n in names if ".attn2." in n]
    ad = random_lora(base.unet, 0, targets=("to_k",))
    assert select_layers(base.unet, adapters=[ad]) == list(ad.modules)
    with pytest.raises(UsageError, match="matches no layer"):
        select_layers(base.unet, pattern="nothing_here")
    ad.modules["unet.down_blocks.5.x"] = next(iter(ad.modules.values()))
    with pytest.raises(UsageError, match="no layer"):
        select_layers(base.unet, adapters=[ad])


def test_file_matches_direct_computation(base, images, tmp_path):
    """The written matrices are E[x xᵀ] of exactly the inputs the layers saw, per role; load_stats reads
    them."""
    seen: dict[str, list[torch.Tensor]] = {"content": [], "style": []}
    layer = base.unet.get_submodule(ATTN1_Q[5:])
    calls = []

    def spy(mod, args):
        x = args[0]
        # the content images are 2 × 2 samples; after them come the style ones
        calls.append(x.shape[0])
        which = "content" if sum(calls) <= 4 else "style"
        seen[which].append(x.reshape(-1, x.shape[-1]).double())

    h = layer.register_forward_pre_hook(spy)
    try:
        out = tmp_path / "stats.safetensors"
        summary = calibrate(
            base,
            out,
            References(Concept(images[0], "a sks thing"), Concept(images[1], "zkz style")),
            samples=2,
            batch_size=4,
            seed=3,
        )
    finally:
        h.remove()
    assert summary["layers"] == 32
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
        sig = {r: f.get_tensor(f"{ATTN1_Q}.{r}").double() for r in ("content", "style")}
        sig_k = f.get_tensor(f"{ATTN2_K}.content").double()
    for r in ("content", "style"):
        x = torch.cat(seen[r])
        assert torch.allclose(sig[r], x.T @ x / x.shape[0], atol=1e-5, rtol=1e-4)
    # cross-attention keys read the prompt embedding only: Σ = mean over tokens of e eᵀ
    e = base.encode_prompt(["a sks thing"])["encoder_hidden_states"][0].double()
    assert torch.allclose(sig_k, e.T @ e / e.shape[0], atol=1e-5)
    assert json.loads(md["counts"]) == {"content": 2 * 2 * 64, "style": 3 * 2 * 64}
    # the stats reader accepts it, and its factors reproduce the matrices
    stats = load_stats(out)
    lc, ls = stats.factors(ATTN1_Q, torch.zeros(1, 32), torch.zeros(1, 32))
    assert torch.allclose(lc @ lc.T, sig["content"], atol=1e-5)
    assert torch.allclose(ls @ ls.T, sig["style"], atol=1e-5)


def test_conv_layers_record_unfolded_patches(base, images):
    """A 3×3 conv LoRA reads c·9 wide patches; the centre tap's diagonal is the channel mean square."""
    name = "unet.up_blocks.1.resnets.0.conv1"
    conv = base.unet.get_submodule(name[5:])
    seen = []
    h = conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].double()))
    try:
        mom = record_moments(
            base,
            [name],
            References(Concept(images[0], "a"), Concept(images[1], "b")),
            samples=1,
            seed=0,
        )
    finally:
        h.remove()
    c = conv.in_channels
    sig = mom.mean(name, "content").double()
    assert sig.shape == (c * 9, c * 9)
    x = seen[0]
    centre = torch.arange(c) * 9 + 4
    assert torch.allclose(sig.diagonal()[centre], (x**2).mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)


def test_low_rank_option(base, images, tmp_path):
    out = tmp_path / "lr.safetensors"
    calibrate(
        base,
        out,
        References(Concept(images[0], "a"), Concept(images[1], "b")),
        layers="attn2.to_k",
        samples=1,
        rank=3,
    )
    stats = load_stats(out)
    lc, _ = stats.factors(ATTN2_K, torch.zeros(1, 32), torch.zeros(1, 32))
    assert lc.shape == (32, 3)
    with pytest.raises(Exception, match="exists"):
        calibrate(
            base,
            out,
            References(Concept(images[0], "a"), Concept(images[1], "b")),
            samples=1,
        )


def test_cli(base, tmp_path):
    from PIL import Image

    from lora_merge.cli import cli

    register_base_model("tiny-test-calibrate", lambda device, dtype: base)
    for role in ("c", "s"):
        (tmp_path / role).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(tmp_path / role / f"{i}.png")
    out = tmp_path / "cli.safetensors"
    args = [
        "calibrate",
        "--base",
        "tiny-test-calibrate",
        "--content-images",
        str(tmp_path / "c"),
        "--content-prompt",
        "a sks thing",
        "--style-images",
        str(tmp_path / "s"),
        "--style-prompt",
        "zkz style",
        "-o",
        str(out),
        "--layers",
        "attn2",
        "--samples",
        "1",
        "--json",
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["layers"] == 16 and out.is_file()
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "exists" in str(again.exception)
    missing = CliRunner().invoke(cli, args[:2] + ["/no/such/model"] + args[3:-1] + ["--force"])
    assert missing.exit_code != 0 and "not a local folder" in str(missing.exception)
