"""Model mode: LoRAs wrapped in a tiny diffusers UNet, masks trained through it."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from lora_merge import masks as M
from lora_merge.engine import Plan
from lora_merge.errors import UsageError
from lora_merge.masks import Concept, MaskObjective, References, SolveOptions
from lora_merge.model_mode.base_model import load_base_model
from lora_merge.model_mode.images import load_image_folder
from lora_merge.model_mode.lora_layers import MaskedLoraLayer, attach_loras
from lora_merge.model_mode.mask_training import (
    MaskLoss,
    _Data,
    _sample,
    layer_roles,
    prior_rank_term,
    similarity_term,
    train_masks,
)
from lora_merge.model_mode.tiny import random_lora, tiny_base_model
from lora_merge.strategies import get_strategy
from lora_merge.strategies.base import LayerInput
from lora_merge.strategies.pair_masks import check_weights_mode, fold_masks


def objective_of(strategy: str = "duolora", **params) -> MaskObjective:
    """The objective ``strategy`` builds from ``params`` (its declared defaults for the rest)."""
    return get_strategy(strategy)(mode="model", **params).mask_objective()


def solve_options(seed: int = 0, batch_size: int = 1, mixed_precision: str = "no") -> SolveOptions:
    return SolveOptions(device=torch.device("cpu"), seed=seed, base=None, mixed_precision=mixed_precision,
                        batch_size=batch_size, progress=False)


def train(base, adapters, content, style, strategy="ziplora", *, eval_batches=0, seed=0, batch_size=1,
          mixed_precision="no", keep_attached=False, **params):
    """:func:`train_masks` with ``strategy``'s objective; ``content``/``style`` are ``(images, prompt)``."""
    refs = References(Concept(*content), Concept(*style))
    return train_masks(base, adapters, refs, objective_of(strategy, **params),
                       solve_options(seed, batch_size, mixed_precision), eval_batches=eval_batches,
                       keep_attached=keep_attached)  # fmt: skip



@pytest.fixture(scope="module")
def world():
    base = tiny_base_model(seed=0)
    content, style = random_lora(base.unet, seed=1), random_lora(base.unet, seed=2, rank=3, alpha=None)
    g = torch.Generator().manual_seed(3)
    images = {
        "content": torch.rand(2, 3, 8, 8, generator=g) * 2 - 1,
        "style": torch.rand(2, 3, 8, 8, generator=g) * 2 - 1,
    }
    return SimpleNamespace(base=base, adapters=[content, style], images=images)


@pytest.fixture
def priors_file(tmp_path):
    p = tmp_path / "priors.json"
    p.write_text(
        json.dumps(
            {
                "format": "lora-merge.priors/1",
                "rules": [
                    {"pattern": "unet.down_blocks.0", "role": "content"},
                    {"pattern": "unet.up_blocks.1", "role": "style"},
                ],
            }
        )
    )
    return str(p)


def _out(base, x, t, cond):
    with torch.no_grad():
        return base.predict(x, t, cond)


# ------------------------------------------------------------------ base model, images, LoRA layers
def test_wrapped_unet_matches_dense_merge(world):
    """Strengths switch one wrapped UNet between base, content-only and merged; each equals a UNet whose
    weights have the dense ΔW added."""
    base = world.base
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 700])
    cond = base.encode_prompt(["a sks thing"])
    ref_base = _out(base, x, t, cond)
    dense = copy.deepcopy(base.unet)
    for name, mod in world.adapters[0].modules.items():
        dense.get_submodule(name[5:]).weight.data += mod.delta()
    loras = attach_loras(base.unet, world.adapters, mask_kinds="rank")
    try:
        assert len(loras.layers) == len(world.adapters[0].modules) == 32
        with loras.configured((0.0, 0.0)):
            assert torch.allclose(_out(base, x, t, cond), ref_base, atol=1e-5)
        with loras.only(0):
            got = _out(base, x, t, cond)
        want = dense(
            x,
            t,
            encoder_hidden_states=base.encode_prompt(["a sks thing"])["encoder_hidden_states"].expand(
                2, -1, -1
            ),
        ).sample
        assert torch.allclose(got, want, atol=1e-4)
        assert not torch.allclose(got, ref_base, atol=1e-3)
        # group scale 0 on every layer of input 0 = the base model again
        with loras.only(0), loras.scaled("unet", 0.0, inputs=[0]) as names:
            assert len(names) == 32
            assert torch.allclose(_out(base, x, t, cond), ref_base, atol=1e-5)
    finally:
        loras.detach()
    assert not any(isinstance(m, MaskedLoraLayer) for m in base.unet.modules())
    assert torch.allclose(_out(base, x, t, cond), ref_base)


@pytest.mark.parametrize("kind", ["rank", "out", "in"])
def test_masked_layer_equals_the_weight_space_fold(world, kind):
    """The wrapped layer computes W0 x + Σ strength·scale·fold(mask) x with the same fold as masks.fold."""
    base = world.base
    loras = attach_loras(base.unet, world.adapters, mask_kinds=kind)
    try:
        name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
        layer = loras.layers[name]
        for s in layer.slots:
            s.mask.data = torch.rand_like(s.mask) * 2 - 1
        x = torch.randn(5, layer.base.in_features)
        want = layer.base(x)
        for s, ad in zip(layer.slots, world.adapters):
            b, a = ad.modules[name].factors()
            b, a = M.fold(kind, b, a, s.mask.detach())
            want = want + ad.modules[name].scale * x @ (b @ a).T
        assert torch.allclose(layer(x), want, atol=1e-5)
    finally:
        loras.detach()


def test_load_base_model_errors(tmp_path):
    with pytest.raises(UsageError, match="not a local folder"):
        load_base_model(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="pipeline folder"):
        load_base_model(str(tmp_path))


def test_load_image_folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (12, 12), 0).save(tmp_path / "b.jpg")
    imgs = load_image_folder(tmp_path, 8)
    assert imgs.shape == (2, 3, 8, 8)
    assert torch.allclose(imgs[0, 0], torch.ones(8, 8)) and torch.allclose(imgs[0, 1], -torch.ones(8, 8))
    assert torch.allclose(imgs[1], -torch.ones(3, 8, 8))
    with pytest.raises(UsageError, match="no images"):
        load_image_folder(_empty(tmp_path), 8)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def _resolutions_from_config(cfg) -> dict[str, int]:
    """The rule read off a UNet config: ``down_blocks.i`` at ``sample_size / 2^i``, ``mid_block`` at the
    lowest, ``up_blocks.j`` mirrored."""
    n = len(cfg.down_block_types)
    res = {f"down_blocks.{i}": cfg.sample_size // 2**i for i in range(n)}
    res["mid_block"] = cfg.sample_size // 2 ** (n - 1)
    res.update({f"up_blocks.{j}": cfg.sample_size // 2 ** (n - 1 - j) for j in range(len(cfg.up_block_types))})
    return res


SD1_TINY = {
    "sample_size": 32, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32, "attention_head_dim": 8,
}  # fmt: skip


@pytest.mark.parametrize("which", ["toyworld", "sd1-tiny", "tiny"])
def test_block_resolutions_from_the_structure_agree_with_the_config(which):
    from diffusers import UNet2DConditionModel

    from lora_merge.arch import block_resolutions, unet_block_resolutions
    from lora_merge.model_mode.tiny import TINY_UNET_CONFIG
    from lora_merge.toyworld.model import UNET_CONFIG

    cfg = {"toyworld": UNET_CONFIG, "sd1-tiny": SD1_TINY, "tiny": TINY_UNET_CONFIG}[which]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    res = unet_block_resolutions(unet)
    assert res == _resolutions_from_config(unet.config)
    if which == "toyworld":
        assert res == block_resolutions("toyworld")  # the table the toy world registers
    elif which == "sd1-tiny":  # SD 1.x's table, scaled from its 64 to this 32
        assert res == {k: v // 2 for k, v in block_resolutions("sd1").items()}


# ------------------------------------------------------------------ terms
def test_torch_terms_equal_the_weight_space_definitions():
    g = torch.Generator().manual_seed(0)
    for rc, rs in ((4, 4), (4, 3), (0, 2)):
        mc, ms = torch.randn(rc, generator=g), torch.randn(rs, generator=g)
        assert float(similarity_term(mc, ms)) == pytest.approx(M.similarity(mc.numpy(), ms.numpy()), abs=1e-6)
        for role in ("content", "style", "neutral"):
            for lam in (0.0, 1.0, 2.5):
                want = M.prior_rank_term(mc.numpy(), ms.numpy(), role, lam)
                assert float(prior_rank_term(mc, ms, role, lam)) == pytest.approx(want, abs=1e-5)


def _objective(world, objective, roles=None, seed=0):
    base = world.base
    loras = attach_loras(base.unet, world.adapters, mask_kinds=objective.axis)
    g = torch.Generator().manual_seed(seed)
    for p in loras.mask_parameters():
        p.data = torch.rand(p.shape, generator=g) + 0.2
    data = _Data(
        world.images["content"],
        world.images["style"],
        {
            "content": base.encode_prompt(["a sks thing"]),
            "style": base.encode_prompt(["zkz style"]),
            "cycle": base.encode_prompt(["a sks thing zkz style"]),
        },
    )
    batch = _sample(data, base, 2, torch.Generator().manual_seed(seed + 1))
    return loras, MaskLoss(base, loras, data, objective, roles or {}), batch


def test_each_switch_removes_its_term(world, priors_file):
    """Weight 0 removes a term: it is not computed (no UNet passes for the cycles), the total drops by
    exactly λ·term, and the gradient equals the gradient without it."""
    roles, _ = layer_roles(list(world.adapters[0].modules), priors_file, world.base)
    assert {r for r, _ in roles.values()} == {"content", "style", "neutral"}  # mid_block: no rule
    full = {"lambda_sim": 0.5, "lambda_prior": 0.3, "lambda_cycle": 0.7, "lambda_rev": 0.9}
    calls = []
    hook = world.base.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        loras, obj, batch = _objective(world, objective_of("duolora", **full), roles)
        try:
            calls.clear()
            terms = obj(batch)
            n_full = len(calls)
            assert set(terms) == {"content", "style", "sim", "prior", "cycle", "rev", "total"}
            assert n_full == 8  # 2 targets + 2 per cycle + 2 merged
            grads_full = torch.autograd.grad(terms["total"], loras.mask_parameters())
            for term, lam_key in (
                ("sim", "lambda_sim"),
                ("prior", "lambda_prior"),
                ("cycle", "lambda_cycle"),
                ("rev", "lambda_rev"),
            ):
                obj.lam = objective_of("duolora", **{**full, lam_key: 0.0}).term_weights()
                calls.clear()
                off = obj(batch)
                assert term not in off
                assert len(calls) == n_full - (2 if term in ("cycle", "rev") else 0)
                want = float(terms["total"].detach() - full[lam_key] * terms[term].detach())
                assert float(off["total"].detach()) == pytest.approx(want, rel=1e-5)
                assert float(terms[term]) > 0
                g_off = torch.autograd.grad(off["total"], loras.mask_parameters())
                assert any(not torch.allclose(a, b) for a, b in zip(g_off, grads_full))
            # with all switches off only the two reconstruction terms remain
            obj.lam = objective_of("duolora").term_weights() | {"sim": 0, "prior": 0, "cycle": 0, "rev": 0}
            base_only = obj(batch)
            assert set(base_only) == {"content", "style", "total"}
            assert float(base_only["total"]) == pytest.approx(
                float(terms["content"] + terms["style"]), rel=1e-5
            )
        finally:
            loras.detach()
    finally:
        hook.remove()


def test_gradient_of_a_disabled_term_is_exactly_absent(world):
    """Similarity off: mask gradients equal those of the reconstruction terms alone."""
    loras, obj, batch = _objective(world, objective_of("ziplora", lambda_sim=0.0))
    try:
        t = obj(batch)
        g = torch.autograd.grad(t["total"], loras.mask_parameters())
        t2 = obj(batch)
        g2 = torch.autograd.grad(t2["content"] + t2["style"], loras.mask_parameters())
        assert all(torch.allclose(a, b) for a, b in zip(g, g2))
        obj.lam = objective_of("ziplora", lambda_sim=1.0).term_weights()
        t3 = obj(batch)
        g3 = torch.autograd.grad(t3["total"], loras.mask_parameters())
        assert any(not torch.allclose(a, b) for a, b in zip(g, g3))
    finally:
        loras.detach()


# ------------------------------------------------------------------ training
def test_training_decreases_objective_counts_steps_and_trains_only_masks(world, priors_file):
    base = world.base
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    res = train(base, world.adapters, (world.images["content"], "a sks thing"), (world.images["style"], "zkz style"),
                "duolora", steps=5, lr=0.05, lambda_sim=0.0, lambda_prior=0.1, lambda_cycle=0.0, priors=str(priors_file),
                prior_init=True, eval_batches=2, batch_size=2)  # fmt: skip
    # every step counts even though the similarity term is switched off (no early exit)
    assert [h["step"] for h in res.history] == [1, 2, 3, 4, 5]
    assert "sim" not in res.history[0]
    assert res.final["total"] < res.initial["total"]
    assert res.num_trainable == 32 * (4 + 3)
    # the UNet is untouched and unwrapped afterwards
    assert not any(isinstance(m, MaskedLoraLayer) for m in base.unet.modules())
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())
    rep = res.report()
    assert rep["steps"] == 5 and len(rep["loss_curve"]) == 5 and rep["trainable_values"] == 224
    assert set(rep["block_mean_masks"]) >= {"down_blocks.0.attentions.0", "up_blocks.1.attentions.0"}


def test_prior_init_uses_the_weight_space_draw(world, priors_file):
    from lora_merge.strategies.base import LayerContext

    res = train(world.base, world.adapters, (world.images["content"], "a b"), (world.images["style"], "c d"),
                "duolora", steps=0, priors=str(priors_file), prior_init=True, lambda_cycle=0.0, seed=5)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    gen = LayerContext(name=name, index=0, seed=5).generator("duolora-prior-init")
    mc, ms = M.prior_init(4, 3, "content", gen)
    assert torch.allclose(res.masks[name][0], mc.float()) and torch.allclose(res.masks[name][1], ms.float())
    assert res.roles[name] == ("content", 1.0)


def test_saved_file_reproduces_trained_merged_layers(world, tmp_path):
    """Fold the learned masks into a standard LoRA, write it, read it back: every layer's output equals the
    wrapped merged layer's output."""
    import lora_merge

    base = world.base
    res = train(base, world.adapters, (world.images["content"], "a sks thing"), (world.images["style"], "zkz style"),
                "ziplora", steps=2, lr=0.05, keep_attached=True)
    loras = res.loras
    try:
        assert any(not torch.allclose(m[0], torch.ones_like(m[0])) for m in res.masks.values())
        out = lora_merge.Adapter(dialect="diffusers")
        for name in loras.layers:
            inputs = []
            for ad in world.adapters:
                b, a = ad.modules[name].factors()
                inputs.append(LayerInput(up=b, down=a, scale=ad.modules[name].scale, weight=1.0))
            up, down, _, _ = fold_masks(inputs, *res.masks[name], "out")
            out.modules[name] = lora_merge.LoraModule.from_tensors(name, down, up, alpha=float(up.shape[1]))
        path = tmp_path / "merged.safetensors"
        lora_merge.save(out, path)
        back = lora_merge.load(path)
        assert set(back.modules) == set(loras.layers)
        with loras.configured((1.0, 1.0), use_masks=True):
            for name, layer in loras.layers.items():
                x = torch.randn(3, layer.base.in_features)
                want = layer(x)
                got = layer.base(x) + x @ back.modules[name].delta().T
                assert torch.allclose(got, want, atol=1e-5), name
    finally:
        loras.detach()


# ------------------------------------------------------------------ the strategies' model-mode solver
def test_model_mode_options_are_checked(world):
    import lora_merge

    strat = get_strategy("ziplora")(mode="model", content_images="x", content_prompt="p", style_images="y",
                                    style_prompt="q")  # fmt: skip
    with pytest.raises(UsageError, match=r"mode='model' needs base=\.\.\.$"):
        lora_merge.merge(world.adapters, strategy=strat)
    strat = get_strategy("duolora")(mode="model", base="toyworld", content_prompt="p")
    with pytest.raises(UsageError, match=r"needs content_images=\.\.\., style_images=\.\.\., style_prompt=\.\.\.$"):
        lora_merge.merge(world.adapters, strategy=strat)
    with pytest.raises(UsageError, match="only apply with mode='model'"):
        check_weights_mode({"base": "toyworld", "mixed_precision": "no"})
    check_weights_mode({"mixed_precision": "no", "batch_size": 1})
    with pytest.raises(UsageError, match="exactly 2"):
        train(None, [1, 2, 3], (None, "a"), (None, "b"))


def test_the_objective_uses_the_declared_defaults():
    """One default per parameter: model mode trains with exactly the strategy's declared values."""
    z = objective_of("ziplora")
    assert (z.steps, z.lr, z.lambda_sim, z.lambda_cycle, z.lambda_prior, z.axis, z.priors) == (
        100, 0.01, 0.01, 0, 0, "out", None)
    duo = get_strategy("duolora")
    declared = {p.name: p.default for p in duo.params}
    d = objective_of("duolora")
    for key in ("steps", "lr", "lambda_sim", "lambda_prior", "lambda_hinge", "lambda_cycle", "prior_init",
                "priors", "closed_form"):
        assert getattr(d, key) == declared[key], key
    assert d.lambda_rev == declared["lambda_cycle"] and d.axis == "rank"
    opts = SolveOptions.from_config(duo(mode="model").config, device="cpu", seed=3)
    assert (opts.batch_size, opts.mixed_precision, opts.seed) == (declared["batch_size"], declared["mixed_precision"], 3)
    d = objective_of("duolora", lambda_cycle=0.02)
    assert (d.lambda_cycle, d.lambda_rev) == (0.02, 0.02)
    paper = objective_of("duolora", preset="paper")  # the preset reaches model mode too
    assert (paper.prior_init, paper.lambda_prior, paper.lambda_cycle) == (True, 0.1, 0.01)


def test_model_mode_code_names_no_strategy():
    """The model solver is driven by the objective alone: no strategy name in lora_merge/model_mode."""
    from pathlib import Path

    import lora_merge.model_mode as mm

    for path in Path(mm.__file__).parent.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert '"duolora"' not in text and '"ziplora"' not in text, path.name


def _image_dirs(tmp_path, world):
    from PIL import Image

    dirs = {}
    for role, imgs in world.images.items():
        d = tmp_path / role
        d.mkdir()
        for i, im in enumerate(imgs):
            arr = ((im.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(d / f"{i}.png")
        dirs[role] = str(d)
    return dirs


@pytest.mark.parametrize("strategy", ["ziplora", "duolora"])
def test_merge_api_model_mode_end_to_end(world, tmp_path, strategy):
    """``lora_merge.merge`` with ``mode=model`` trains, folds and writes a standard LoRA whose layers equal
    the learned masks folded into the inputs; the report carries the loss curve."""
    import lora_merge
    from lora_merge.model_mode.base_model import register_base_model
    from lora_merge.strategies import get_strategy

    register_base_model("tiny-test-merge", lambda device, dtype: world.base)
    dirs = _image_dirs(tmp_path, world)
    params = {
        "mode": "model",
        "base": "tiny-test-merge",
        "content_images": dirs["content"],
        "content_prompt": "a sks thing",
        "style_images": dirs["style"],
        "style_prompt": "zkz style",
        "steps": 2,
        "lr": 0.05,
    }
    if strategy == "duolora":
        params["cycle_prompt"] = "a sks thing zkz style"
    else:  # ZipLoRA has no Constyle cycles, hence no cycle options
        with pytest.raises(UsageError, match="cycle_prompt"):
            get_strategy(strategy)(**params, cycle_prompt="x")
    strat = get_strategy(strategy)(**params)
    out = tmp_path / "merged.safetensors"
    res = lora_merge.merge(world.adapters, out, strategy=strat, seed=1, weights=[0.7, 1.3])
    rep = res.report["strategy"]
    mm = rep["model_mode"]
    assert rep["mode"] == "model" and mm["steps"] == 2 and len(mm["loss_curve"]) == 2
    c, s = world.adapters
    want = sum(
        m.rank + s.modules[n].rank if strategy == "duolora" else 2 * m.out_features
        for n, m in c.modules.items()
    )
    assert rep["trainable_values"] == want
    if strategy == "duolora":
        assert {"cycle", "rev", "prior"} <= set(mm["loss_curve"][0])
    back = lora_merge.load(out)
    assert set(back.modules) == set(world.adapters[0].modules)
    assert json.loads(back.metadata["lora_merge.recipe"])["params"]["mode"] == "model"
    sidecar = strat.sidecars()["masks"]
    axis = "rank" if strategy == "duolora" else "out"
    for name in list(back.modules)[::7]:
        ins = [
            LayerInput(*ad.modules[name].factors(), scale=ad.modules[name].scale, weight=w)
            for ad, w in zip(world.adapters, (0.7, 1.3))
        ]
        masks = [sidecar[f"{name}.mask_content"], sidecar[f"{name}.mask_style"]]
        assert not torch.allclose(masks[0], torch.ones_like(masks[0]))
        up, down, _, _ = fold_masks(ins, *masks, axis)
        assert torch.allclose(back.modules[name].delta(), up @ down, atol=1e-5)


# ------------------------------------------------------------------ diffusers pipeline folders (tiny, local)
def _build_pipeline(root, xl: bool):
    """A tiny SD 1.x / SDXL pipeline folder written with save_pretrained (nothing downloaded)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in ("a", "photo", "of", "sks", "dog", "in", "zkz", "style"):
        vocab[w + "</w>"] = len(vocab)
    for d in ("tokenizer", "tokenizer_2") if xl else ("tokenizer",):
        (root / d).mkdir()
        (root / d / "vocab.json").write_text(json.dumps(vocab))
        (root / d / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(
            str(root / d / "vocab.json"), str(root / d / "merges.txt"), model_max_length=8
        ).save_pretrained(root / d)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        projection_dim=16,
    )
    CLIPTextModel(cfg).save_pretrained(root / "text_encoder")
    if xl:
        CLIPTextModelWithProjection(cfg).save_pretrained(root / "text_encoder_2")
    ucfg = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32 if xl else 16,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }
    if xl:
        ucfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 48,
        )
    UNet2DConditionModel(**ucfg).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(root / "vae")
    EulerDiscreteScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"}
    if xl:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("xl", [False, True], ids=["sd1", "sdxl"])
def test_pipeline_folder_matches_diffusers_pipeline(tmp_path, xl):
    """Prompt conditioning and latents equal what the diffusers pipeline computes from the same folder."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = _build_pipeline(tmp_path / "pipe", xl)
    parts = {
        "vae": AutoencoderKL.from_pretrained(root / "vae"),
        "unet": UNet2DConditionModel.from_pretrained(root / "unet"),
        "scheduler": EulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        "tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder"),
    }
    base = load_base_model(str(root))
    assert base.arch == ("sdxl" if xl else "sd1") and base.image_size == 16
    cond = base.encode_prompt(["a photo of sks dog"])
    if xl:
        pipe = StableDiffusionXLPipeline(
            **parts,
            tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
        )
        emb, _, pooled, _ = pipe.encode_prompt(
            "a photo of sks dog", device="cpu", do_classifier_free_guidance=False
        )
        tids = pipe._get_add_time_ids(
            (16, 16),
            (0, 0),
            (16, 16),
            dtype=emb.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
        assert torch.allclose(cond["added_cond_kwargs"]["text_embeds"], pooled, atol=1e-6)
        assert torch.equal(cond["added_cond_kwargs"]["time_ids"], tids)
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        emb, _ = pipe.encode_prompt(
            "a photo of sks dog", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    assert torch.allclose(cond["encoder_hidden_states"], emb, atol=1e-6)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    vae = parts["vae"]
    assert torch.allclose(
        base.encode_images(x), vae.encode(x).latent_dist.mean * vae.config.scaling_factor, atol=1e-5
    )
    # a model-mode run and a calibration go through the folder's UNet
    ads = [random_lora(base.unet, 1), random_lora(base.unet, 2)]
    res = train(base, ads, (x, "a photo of sks dog"), (x, "a dog in zkz style"), "duolora", steps=1,
                lambda_cycle=0.01, lambda_rev=0.01, priors="none")
    assert len(res.history) == 1 and {"cycle", "rev"} <= set(res.history[0])


def test_mixed_precision(world):
    """bf16 autocast trains on CPU; fp16 on CPU is refused (accelerate would quietly run fp32)."""
    x = world.images["content"]
    res = train(world.base, world.adapters, (x, "a"), (x, "b"), steps=1, mixed_precision="bf16")
    assert len(res.history) == 1 and res.history[0]["total"] > 0
    with pytest.raises(UsageError, match="fp16' needs a GPU"):
        train(world.base, world.adapters, (x, "a"), (x, "b"), steps=1, mixed_precision="fp16")
    # a later fp32 run in the same process is not stuck with the earlier precision
    res = train(world.base, world.adapters, (x, "a"), (x, "b"), steps=1)
    assert len(res.history) == 1


def test_x0_recovery_inverts_add_noise(world):
    """The Constyle cycle's x̂0: exact inverse of adding noise with the true ε (or v), clipped as the scheduler."""
    from diffusers import DDPMScheduler

    base = world.base
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    eps, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 990])
    noisy = base.add_noise(x, eps, t)
    ref = base.scheduler.add_noise(x, eps, t)
    assert torch.allclose(noisy, ref, atol=1e-6)
    assert torch.allclose(base.predict_x0(noisy, eps, t), x, atol=1e-3)
    assert float(base.predict_x0(noisy, torch.zeros_like(eps), t).abs().max()) <= 1.0  # clip_sample
    v_base = copy.copy(base)
    v_base.scheduler = DDPMScheduler(
        num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False
    )
    v = v_base.scheduler.get_velocity(x, eps, t)
    assert torch.allclose(v_base.predict_x0(noisy, v, t), x, atol=1e-4)


def test_weights_apply_once_per_layer(world):
    """Per-input and per-layer weights multiply each LoRA's own alpha/r once, as the engine does."""
    name = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    plan = Plan(world.adapters, ["content", "style"], weights=[0.5, 2.0], layer_weights=[("up_blocks.1", [3.0, 1.0])])
    fn = plan.coeffs
    assert fn(name) == (1.5, 2.0) and fn("unet.down_blocks.0.x") == (0.5, 2.0)
    loras = attach_loras(world.base.unet, world.adapters, weights=fn)
    try:
        c, s = (ad.modules[name] for ad in world.adapters)
        assert [sl.scale for sl in loras.layers[name].slots] == [
            pytest.approx(c.scale * 1.5),
            pytest.approx(s.scale * 2),
        ]
        want = 1.5 * c.delta() + 2.0 * s.delta()
        assert torch.allclose(loras.layers[name].merged_delta(), want, atol=1e-6)
    finally:
        loras.detach()


def test_cli_merge_model_mode(world, tmp_path, capsys):
    """``lora-merge merge C S --strategy duolora --mode model …`` writes a LoRA; missing or stray model-mode
    options are one-line usage errors."""
    import lora_merge
    from lora_merge.cli import main
    from lora_merge.model_mode.base_model import register_base_model

    register_base_model("tiny-test-cli", lambda device, dtype: world.base)
    dirs = _image_dirs(tmp_path, world)
    paths = []
    for i, ad in enumerate(world.adapters):
        paths.append(tmp_path / f"in{i}.safetensors")
        lora_merge.save(ad, paths[-1])
    out = tmp_path / "out.safetensors"
    common = [*map(str, paths), "-o", str(out), "--strategy", "duolora"]
    model = ["--base", "tiny-test-cli", "--content-images", dirs["content"], "--content-prompt", "a sks thing",
             "--style-images", dirs["style"], "--style-prompt", "zkz style"]  # fmt: skip

    def run(argv):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        return exc.value.code, capsys.readouterr().err

    code, err = run(["merge", *common, "--mode", "model", *model, "--steps", "1", "--lambda-cycle", "0"])
    assert code == 0, err
    assert lora_merge.load(out).modules.keys() == world.adapters[0].modules.keys()
    code, err = run(["merge", *common, "--mode", "model", *model[2:], "--force"])
    assert code == 2 and "--mode model needs --base" in err and "Traceback" not in err
    code, err = run(["merge", *common, *model, "--force"])
    assert code == 2 and "only apply with --mode model" in err


def test_bench_rows():
    """The toy-world bench rows: model-mode ZipLoRA/DuoLoRA and DuoLoRA's ablation, with the toy world's
    references and prompts."""
    from lora_merge.bench.variants import model_mode_variants

    rows = {v.label: v for v in model_mode_variants(None, ablations=True, calibrated=False)}
    assert set(rows) == {"ziplora (model)", "duolora (model)", "duolora (model, paper preset)",
                         "duolora (model, ZipRank only)", "duolora (model, ZipRank + priors)"}  # fmt: skip
    assert "cycle_prompt" not in rows["ziplora (model)"].params
    only = rows["duolora (model, ZipRank only)"].params
    assert (
        only["mode"] == "model"
        and only["base"] == "toyworld"
        and only["content_images"] == "toyworld:sks"
        and only["cycle_prompt"] == "a sks object in zkz style"
    )
    assert (only["lambda_prior"], only["lambda_cycle"]) == (0.0, 0.0)
    assert "lambda_cycle" not in rows["duolora (model)"].params  # the full row (+ Constyle): the defaults
    assert rows["duolora (model, paper preset)"].params["preset"] == "paper"
    assert [v.label for v in model_mode_variants(["ziplora"], ablations=False, calibrated=False)] == [
        "ziplora (model)"
    ]


def test_modules_outside_the_unet_are_listed_not_trained(world):
    from lora_merge.adapter import Adapter, LoraModule

    extra = Adapter(modules=dict(world.adapters[0].modules))
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    extra.modules[te] = LoraModule.from_tensors(te, torch.randn(2, 8), torch.randn(8, 2))
    x = world.images["content"]
    res = train(world.base, [extra, world.adapters[1]], (x, "a"), (x, "b"), steps=0)
    assert res.skipped == [te] and te not in res.masks and len(res.masks) == 32
    assert res.report()["not_trained"] == [te]
