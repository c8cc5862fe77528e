"""The toy world: deterministic rendering, the shipped model/LoRAs/judge load and behave."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from lora_merge import load
from lora_merge import toyworld as tw
from lora_merge.arch import BLOCK_RESOLUTIONS, guess_arch, resolution_of
from lora_merge.errors import UsageError
from lora_merge.plugins import load_all
from lora_merge.toyworld.world import parse_prompt

load_all()  # the toy world's registrations (arch facts), as any lora-merge command does


def test_render_is_deterministic_and_varies_with_seed():
    for shape in tw.SHAPES:
        for style in tw.STYLES:
            a = tw.render(shape, style, 123)
            assert a.shape == (3, tw.IMAGE_SIZE, tw.IMAGE_SIZE)
            assert torch.equal(a, tw.render(shape, style, 123))
            assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(tw.render("circle", "stripes", 1), tw.render("circle", "stripes", 2))
    # shapes and styles really differ
    assert not torch.equal(tw.render("circle", "solid", 5), tw.render("square", "solid", 5))
    assert not torch.equal(tw.render("circle", "solid", 5), tw.render("circle", "zkz", 5))


def test_render_rejects_unknown_words():
    with pytest.raises(UsageError, match="hexagon"):
        tw.render("hexagon", "solid", 0)
    with pytest.raises(UsageError, match="plaid"):
        tw.render("circle", "plaid", 0)


def test_captions_and_prompts():
    assert tw.caption("circle", "stripes") == "a circle in stripes style"
    assert tw.caption("sks", None) == tw.CONTENT_PROMPT
    assert tw.caption("sks", "zkz") == tw.JOINT_PROMPT
    assert parse_prompt(tw.JOINT_PROMPT) == ("sks", "zkz")
    assert parse_prompt(tw.STYLE_PROMPT) == ("circle", "zkz")
    assert "sks" not in tw.SEEN_SHAPES and "zkz" not in tw.SEEN_STYLES


def test_reference_images_are_the_training_sets():
    c = tw.reference_images("content", 4)
    s = tw.reference_images("style", 6)
    assert c.shape == (4, 3, 16, 16) and s.shape == (6, 3, 16, 16)
    assert torch.equal(c, tw.reference_images("content", 4))
    with pytest.raises(UsageError):
        tw.reference_images("subject", 2)


@pytest.fixture(scope="module")
def world():
    return tw.load_base()


def test_base_model_has_sdxl_block_layout(world):
    unet = world.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert world.arch == "toyworld" and world.image_size == 16
    h = world.encode_prompt([tw.JOINT_PROMPT, "a circle in dots style"])
    assert h.shape[0] == 2 and h.shape[2] == unet.config.cross_attention_dim
    assert set(BLOCK_RESOLUTIONS["toyworld"]) >= {"down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0"}
    with pytest.raises(UsageError, match="unknown word"):
        world.encode_prompt(["a hexagon"])


def test_bundled_loras_are_standard_diffusers_files():
    paths = tw.bundled_loras()
    for concept in ("content", "style"):
        ad = load(paths[concept])
        assert ad.dialect == "diffusers"
        assert guess_arch(ad) == "toyworld"
        # 7 transformer blocks (down 1/2, mid, up 0/1 × 2) × (attn1 + attn2) × (q, k, v, out.0)
        assert len(ad) == 56
        assert set(ad.ranks) == {8}
        names = set(ad.modules)
        assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in names
        assert "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0" in names
        assert resolution_of("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "toyworld") == 4


def test_apply_lora_folds_delta_exactly(world):
    path = tw.bundled_loras()["style"]
    ad = load(path)
    name = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    base_w = world.unet.get_submodule(name[5:]).weight.detach().clone()
    u = tw.apply_lora(world.unet, ad, scale=0.5)
    got = u.get_submodule(name[5:]).weight - base_w
    torch.testing.assert_close(got, 0.5 * ad[name].delta(flat=False), rtol=1e-5, atol=1e-6)
    # the base UNet is untouched
    assert torch.equal(world.unet.get_submodule(name[5:]).weight, base_w)
    # group scales: zero one group, keep the rest
    u2 = tw.apply_lora(world.unet, ad, lora_group_scales={"up_blocks.1": 0.0})
    assert torch.equal(u2.get_submodule(name[5:]).weight, base_w)
    other = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    assert not torch.equal(u2.get_submodule(other).weight, world.unet.get_submodule(other).weight)


def test_sample_is_deterministic_and_lora_changes_it(world):
    a = tw.sample(world, tw.JOINT_PROMPT, seeds=[0, 1], steps=4)
    b = tw.sample(world, [tw.JOINT_PROMPT] * 2, seeds=[0, 1], steps=4)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    # per-image seeds: image 1 does not depend on image 0
    c = tw.sample(world, tw.JOINT_PROMPT, seeds=[1], steps=4)
    torch.testing.assert_close(c[0], a[1], rtol=1e-4, atol=1e-4)
    d = tw.sample(world, tw.JOINT_PROMPT, seeds=[0, 1], steps=4, adapter=tw.bundled_loras()["content"])
    assert (d - a).abs().max() > 0.05


def test_judge_recognises_renders_of_every_class():
    judge = tw.load_judge()
    assert judge.shapes == list(tw.SHAPES) and judge.styles == list(tw.STYLES)
    shapes = [s for s in tw.SHAPES for _ in tw.STYLES]
    styles = [t for _ in tw.SHAPES for t in tw.STYLES]
    imgs = tw.render_batch(shapes, styles, [9000 + i for i in range(len(shapes))])
    names = judge.predict_names(imgs)
    ok = sum(p == (s, t) for p, (s, t) in zip(names, zip(shapes, styles)))
    assert ok >= len(shapes) - 1


def test_evaluate_reports_accuracies(world):
    from lora_merge.bench.quality import evaluate

    res = evaluate(tw.bundled_loras()["style"], n=2, prompt=tw.STYLE_PROMPT, steps=4)
    assert res["n"] == 2 and 0.0 <= res["joint_acc"] <= 1.0
    res = evaluate(None, n=2, prompt=tw.CONTENT_PROMPT, steps=4)
    assert res["style_acc"] is None and res["joint_acc"] == res["content_acc"]
    with pytest.raises(UsageError, match="names no"):
        evaluate(None, n=1, prompt="an object")
