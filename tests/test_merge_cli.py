"""``lora-merge merge`` / ``strategies`` end to end on real files, recipes, and a tiny diffusers UNet."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import shared_fixture
from safetensors import safe_open

import lora_merge as lm
from lora_merge import Adapter, LoraModule
from lora_merge.cli import main
from lora_merge.errors import MergeError


def run(argv, capsys):
    """Run the CLI in-process (``merge`` unless the first word is a command); returns (code, out, err)."""
    argv = list(map(str, argv))
    if argv[0] not in ("merge", "strategies"):
        argv = ["merge", *argv]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def raw_factors(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(B, A)`` per module straight from the file's keys (the SD 1.5 fixtures carry no alpha: scale 1)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open handle, not a dict)
            name = k.removeprefix("unet.")
            name = (
                name.replace(".processor.", ".")
                .replace("_lora.", ".lora.")
                .replace("to_out.lora", "to_out.0.lora")
            )
            mod, _, which = name.rpartition(".lora.")
            parts.setdefault(mod, {})[which.split(".")[0]] = f.get_tensor(k).double()
    return {m: (p["up"], p["down"]) for m, p in parts.items()}


def raw_deltas(path) -> dict[str, torch.Tensor]:
    return {m: b @ a for m, (b, a) in raw_factors(path).items()}


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def fro2(terms) -> float:
    """‖Σ c_j B_j A_j‖²_F in fp64 from the factors: with P = [c_j B_j], Q = [A_j], ‖PQ‖² = Σ (PᵀP) ⊙ (QQᵀ)."""
    p = torch.cat([c * b.double() for c, b, _ in terms], 1)
    q = torch.cat([a.double() for _, _, a in terms], 0)
    return float(((p.T @ p) * (q @ q.T)).sum())


def rel_factors(module, ref_terms) -> float:
    """Relative Frobenius error of a merged module against Σ c_j B_j A_j."""
    b, a = module.factors(torch.float64)
    return (
        max(fro2([(module.scale, b, a)] + [(-c, rb, ra) for c, rb, ra in ref_terms]), 0.0) ** 0.5
        / fro2(ref_terms) ** 0.5
    )


# ---------------------------------------------------------------- real fixtures
def test_linear_exact_on_real_sd15_fixtures_mixed_dialects(tmp_path, capsys):
    files = [
        shared_fixture(f"sd15/{n}.safetensors")
        for n in ("pokemon_style", "rick_and_morty_style", "course3_unet_prefixed")
    ]
    w = [0.8, -0.35, 0.5]
    out = tmp_path / "merged.safetensors"
    code, stdout, err = run([*files, "-o", out, "--weights", ",".join(map(str, w)), "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["modules"] == 128
    refs = [raw_factors(f) for f in files]
    merged = lm.load(out)
    assert len(merged) == 128
    for name, m in merged.modules.items():
        key = name.removeprefix("unet.")
        assert rel_factors(m, [(wi, *r[key]) for wi, r in zip(w, refs)]) < 1e-6, name
        assert m.rank == 12
    md = merged.metadata
    recipe = json.loads(md["lora_merge.recipe"])
    import hashlib

    assert recipe["inputs"][0]["sha256"] == hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert recipe["weights"] == w and recipe["strategy"] == "linear"
    assert md["ss_network_dim"] == md["ss_network_alpha"] == "12"
    assert "pokemon_style.safetensors" in md["modelspec.merged_from"]


def test_fp16_kohya_with_alpha_and_conv_merged_with_diffusers_fixture(tmp_path):
    fix = shared_fixture("sd15/rick_and_morty_style.safetensors")
    g = torch.Generator().manual_seed(0)
    conv = "unet.down_blocks.0.resnets.0.conv1"
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ad = Adapter(dialect="kohya")
    ad.modules[q] = LoraModule.from_tensors(
        q, torch.randn(8, 320, generator=g).half(), torch.randn(320, 8, generator=g).half() * 0.01, alpha=3.0
    )
    ad.modules[conv] = LoraModule.from_tensors(
        conv,
        torch.randn(8, 320, 3, 3, generator=g).half(),
        torch.randn(320, 8, 1, 1, generator=g).half() * 0.01,
        alpha=4.0,
    )
    kfile = lm.save(ad, tmp_path / "k.safetensors", to="kohya")
    w = [1.5, -0.5]
    with pytest.warns(lm.errors.MissingModuleWarning):
        res = lm.merge([kfile, fix], tmp_path / "out.safetensors", weights=w, to="kohya")
    ref_fix = raw_deltas(fix)
    ref_q = 1.5 * (3.0 / 8) * ad[q].up.tensor.double() @ ad[q].down.tensor.double() - 0.5 * ref_fix[q[5:]]
    out = lm.load(res.output)
    assert out.dialect == "kohya"
    assert rel(out[q].delta(torch.float64), ref_q) < 1e-6
    ref_c = (
        1.5 * 0.5 * ad[conv].up.tensor.double().reshape(320, 8) @ ad[conv].down.tensor.double().reshape(8, -1)
    )
    assert rel(out[conv].delta(torch.float64), ref_c) < 1e-6
    assert out[conv].kind == "conv" and out[conv].rank == 8


def _sdxl_like(path):
    ad = Adapter(dialect="diffusers")
    for n, (o, i) in {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q": (640, 640),
    }.items():
        ad.modules[n] = LoraModule.from_tensors(n, torch.randn(4, i), torch.randn(o, 4))
    return lm.save(ad, path, to="diffusers")


def test_sd1_with_sdxl_is_a_clear_error(tmp_path, capsys):
    sd1 = shared_fixture("sd15/pokemon_style.safetensors")
    xl = _sdxl_like(tmp_path / "xl.safetensors")
    code, _, err = run([sd1, xl, "-o", tmp_path / "o.safetensors"], capsys)
    assert code == MergeError.exit_code
    assert "Stable Diffusion 1.x" in err and "Stable Diffusion XL" in err and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()
    code, _, err = run([sd1, xl, "-o", tmp_path / "o.safetensors", "--allow-mixed-arch"], capsys)
    assert code == MergeError.exit_code  # forced past the architecture check, the shapes still differ
    assert "attn2.to_k" in err and "640×768" in err and "640×2048" in err and "Traceback" not in err


def test_existing_output_refused_untouched_and_force(tmp_path, capsys):
    a = shared_fixture("sd15/pokemon_style.safetensors")
    b = shared_fixture("sd15/rick_and_morty_style.safetensors")
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run([a, b, "-o", out], capsys)
    assert code == 4 and "--force" in err and out.read_bytes() == b"keep me"
    code, _, err = run([a, b, "-o", out, "--force"], capsys)
    assert code == 0, err
    assert len(lm.load(out)) == 128
    code, _, err = run([out, b, "-o", out, "--force"], capsys)  # never over an input
    assert code == 4 and "input" in err


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C after the data is written but before the rename: no output, no temp file left behind."""
    import os

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    a = shared_fixture("sd15/pokemon_style.safetensors")
    b = shared_fixture("sd15/rick_and_morty_style.safetensors")
    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        lm.merge([a, b], tmp_path / "o.safetensors")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_peft_conflicting_heads(tmp_path, capsys):
    emo = shared_fixture("peft/distilbert_emotion")
    imdb = shared_fixture("peft/distilbert_imdb")
    out = tmp_path / "merged"
    code, _, err = run([emo, imdb, "-o", out], capsys)
    assert code == MergeError.exit_code
    assert "classifier.weight (6×768 in input 1 vs 2×768 in input 2)" in err and "--keep-heads-from" in err
    assert not out.exists()
    code, _, err = run([emo, imdb, "-o", out, "--keep-heads-from", "2", "--weights", "0.5,0.5"], capsys)
    assert code == 0, err
    merged = lm.load(out)
    assert merged.extra_tensors["classifier.weight"].shape == (2, 768)
    src = lm.load(imdb)
    assert torch.equal(
        merged.extra_tensors["classifier.weight"].load(), src.extra_tensors["classifier.weight"].load()
    )
    name = next(iter(src.modules))
    ref = 0.5 * lm.load(emo)[name].delta() + 0.5 * src[name].delta()
    assert rel(merged[name].delta(), ref) < 1e-6


def test_peft_identical_heads_kept(tmp_path):
    emo = shared_fixture("peft/distilbert_emotion")
    res = lm.merge([emo, emo], tmp_path / "m", weights=[0.5, 0.25])
    src = lm.load(emo)
    assert set(res.adapter.extra_tensors) == set(src.extra_tensors)
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["peft_type"] == "LORA"


# ---------------------------------------------------------------- options from the registry
def test_strategy_option_not_taken_is_refused(tmp_path, capsys):
    a = shared_fixture("sd15/pokemon_style.safetensors")
    code, _, err = run([a, a, "-o", tmp_path / "o.safetensors", "--density", "0.3"], capsys)
    assert code == 2 and "--density" in err and "'linear'" in err
    code, _, err = run([a, a, "-o", tmp_path / "o.safetensors", "-s", "ties", "--density", "abc"], capsys)
    assert code == 2 and "density" in err
    assert not (tmp_path / "o.safetensors").exists()


def _small_pair(tmp_path):
    """Two small synthetic files (dense strategies run a full SVD per layer; keep layers tiny in tests)."""
    paths = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        ad = Adapter(dialect="diffusers")
        for i in range(3):
            n = f"unet.up_blocks.1.attentions.{i}.transformer_blocks.0.attn2.to_v"
            ad.modules[n] = LoraModule.from_tensors(
                n, torch.randn(6, 24, generator=g), torch.randn(40, 6, generator=g), alpha=3.0
            )
        paths.append(lm.save(ad, tmp_path / f"in{seed}.safetensors"))
    return paths


def test_strategy_options_reach_the_strategy(tmp_path, capsys):
    a, b = _small_pair(tmp_path)
    out = tmp_path / "o.safetensors"
    code, stdout, err = run(
        [
            a,
            b,
            "-o",
            out,
            "-s",
            "dare",
            "--density",
            "0.25",
            "--variant",
            "ties",
            "--seed",
            "3",
            "--rank",
            "4",
            "--dtype",
            "fp16",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    info = json.loads(stdout)
    assert info["params"]["density"] == 0.25 and info["params"]["variant"] == "ties" and info["rank_max"] <= 4
    m = lm.load(out)
    assert next(iter(m)).dtype == torch.float16
    recipe = json.loads(m.metadata["lora_merge.recipe"])
    assert recipe["seed"] == 3 and recipe["rank"] == 4 and recipe["params"]["density"] == 0.25


def test_layer_weight_option(tmp_path, capsys):
    a = shared_fixture("sd15/pokemon_style.safetensors")
    b = shared_fixture("sd15/rick_and_morty_style.safetensors")
    out = tmp_path / "o.safetensors"
    code, _, err = run([a, b, "-o", out, "--weight", "up_blocks.3=0", "--weight", "attn2=1,0"], capsys)
    assert code == 0, err
    m = lm.load(out)
    ra, rb = raw_factors(a), raw_factors(b)
    for name, mod in m.modules.items():
        k = name.removeprefix("unet.")
        if k.startswith("up_blocks.3"):
            assert float(mod.up.load().abs().max()) * float(mod.down.load().abs().max()) == 0.0
        elif ".attn2." in k:
            assert rel_factors(mod, [(1.0, *ra[k])]) < 1e-6
        else:
            assert rel_factors(mod, [(1.0, *ra[k]), (1.0, *rb[k])]) < 1e-6


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize("fmt", ["yaml", "toml"])
def test_recipe_file_and_cli_override(tmp_path, capsys, fmt):
    a, b = _small_pair(tmp_path)
    if fmt == "yaml":
        text = (
            f"inputs: ['{a}', '{b}']\noutput: out.safetensors\nstrategy: ties\nweights: [0.5, 0.5]\n"
            "density: 0.4\nlayer_weights: ['attn2=2']\nseed: 9\n"
        )
    else:
        text = (
            f"inputs = ['{a}', '{b}']\noutput = 'out.safetensors'\nstrategy = 'ties'\nweights = [0.5, 0.5]\n"
            "seed = 9\nlayer_weights = ['attn2=2']\n[params]\ndensity = 0.4\n"
        )
    cfg = tmp_path / f"r.{fmt}"
    cfg.write_text(text)
    code, _, err = run(["--config", cfg, "--weights", "1,0.25", "--json"], capsys)
    assert code == 0, err
    out = tmp_path / "out.safetensors"  # relative to the recipe's folder
    recipe = json.loads(lm.load(out).metadata["lora_merge.recipe"])
    assert recipe["strategy"] == "ties" and recipe["params"]["density"] == 0.4 and recipe["seed"] == 9
    assert recipe["weights"] == [1.0, 0.25]  # the flag overrode the file
    assert recipe["layer_weights"] == [["attn2", [2.0, 2.0]]]


def test_recipe_unknown_key_and_replay_from_metadata(tmp_path, capsys):
    a = tmp_path / "missing.safetensors"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"inputs: ['{a}']\nwieghts: [1]\n")
    code, _, err = run(["--config", bad, "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "wieghts" in err
    bad.write_text(f"inputs: ['{a}']\nstrategy: linear\ndensity: 0.5\n")
    code, _, err = run(["--config", bad, "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "density" in err

    a, b = _small_pair(tmp_path)
    first = lm.merge(
        [a, b],
        tmp_path / "one.safetensors",
        strategy="dare",
        params={"density": 0.5},
        seed=4,
        weights=[0.6, 0.7],
    )
    replay = tmp_path / "replay.json"
    replay.write_text(lm.load(first.output).metadata["lora_merge.recipe"])
    code, _, err = run(["--config", replay, "-o", tmp_path / "two.safetensors"], capsys)
    assert code == 0, err
    x, y = lm.load(first.output), lm.load(tmp_path / "two.safetensors")
    for name in x.modules:
        assert torch.equal(x[name].up.load(), y[name].up.load()) and torch.equal(
            x[name].down.load(), y[name].down.load()
        )


def test_recipe_sha_mismatch(tmp_path, capsys):
    a = shared_fixture("sd15/pokemon_style.safetensors")
    cfg = tmp_path / "r.json"
    cfg.write_text(json.dumps({"inputs": [{"path": str(a), "sha256": "0" * 64}, str(a)]}))
    code, _, err = run(["--config", cfg, "-o", tmp_path / "o.safetensors"], capsys)
    assert code == MergeError.exit_code and "sha256" in err


# ---------------------------------------------------------------- strategies command
def test_strategies_command(capsys):
    code, out, _ = run(["strategies", "--json"], capsys)
    assert code == 0
    names = {s["name"] for s in json.loads(out)}
    assert {"linear", "svd", "ties", "dare", "magnitude-prune", "blocks"} <= names
    code, out, _ = run(["strategies", "ties", "--json"], capsys)
    info = json.loads(out)
    assert info["name"] == "ties" and {p["option"] for p in info["params"]} == {
        "--density",
        "--sign",
        "--divide",
    }
    code, out, _ = run(["strategies"], capsys)
    assert code == 0 and "magnitude-prune" in out
    code, out, _ = run(["strategies", "dare"], capsys)
    assert code == 0 and "--variant" in out
    code, _, err = run(["strategies", "nope"], capsys)
    assert code == 2 and "unknown strategy" in err


def test_merge_help_points_to_the_generated_strategy_options(capsys):
    code, out, _ = run(["merge", "--help"], capsys)
    assert code == 0
    for opt in ("--weight", "--rank", "--config"):
        assert opt in out
    assert "lora-merge strategies NAME" in " ".join(out.split())  # each strategy's options are listed there
    for name in ("dare", "ties", "svd", "blocks"):
        code, out, _ = run(["strategies", name], capsys)
        assert code == 0 and {"dare": "--variant", "ties": "--density", "svd": "--energy", "blocks": "--preset"}[name] in out


# ---------------------------------------------------------------- diffusers loads the merged file
def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def _random_lora(unet, seed, r, alpha):
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="diffusers")
    for n, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".attn" in n:
            down = torch.randn(r, mod.in_features, generator=g) * 0.3
            up = torch.randn(mod.out_features, r, generator=g) * 0.3
        elif isinstance(mod, torch.nn.Conv2d) and n.endswith("resnets.0.conv1"):
            down = torch.randn(r, mod.in_channels, *mod.kernel_size, generator=g) * 0.1
            up = torch.randn(mod.out_channels, r, 1, 1, generator=g) * 0.1
        else:
            continue
        ad.modules["unet." + n] = LoraModule.from_tensors("unet." + n, down, up, alpha)
    return ad


def test_diffusers_loads_merge_like_set_adapters(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    base = _tiny_unet()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    a = lm.save(_random_lora(base, 1, 4, 2.0), tmp_path / "a.safetensors", to="diffusers")
    b = lm.save(_random_lora(base, 2, 8, 4.0), tmp_path / "b.safetensors", to="diffusers")
    w = [0.7, -0.4]
    merged = lm.merge([a, b], tmp_path / "m.safetensors", weights=w, to="diffusers").output

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ctx = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([10])

    def outputs(unet):
        layer = {}
        hooks = [
            m.register_forward_hook(lambda mod, i, o, n=n: layer.__setitem__(n, o.detach()))
            for n, m in unet.named_modules()
            if n.endswith(("attn2.to_v", "attn1.to_out.0", "resnets.0.conv1"))
        ]
        with torch.no_grad():
            out = unet(x, t, encoder_hidden_states=ctx).sample
        for h in hooks:
            h.remove()
        return out, layer

    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    class TinyPipe(StableDiffusionLoraLoaderMixin):
        """Just enough of a pipeline for diffusers' own ``load_lora_weights`` / ``set_adapters``."""

        hf_device_map = None

        def __init__(self, unet):
            self.unet, self.text_encoder = unet, None

        @property
        def components(self):
            return {"unet": self.unet}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = _tiny_unet()
        one.load_state_dict(state)
        TinyPipe(one).load_lora_weights(str(merged), adapter_name="merged")
        two = _tiny_unet()
        two.load_state_dict(state)
        pipe = TinyPipe(two)
        pipe.load_lora_weights(str(a), adapter_name="a")
        pipe.load_lora_weights(str(b), adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=w)
        plain = _tiny_unet()
        plain.load_state_dict(state)
    o1, l1 = outputs(one)
    o2, l2 = outputs(two)
    o0, _ = outputs(plain)
    assert float((o2 - o0).abs().max()) > 1e-3  # the LoRAs do something
    torch.testing.assert_close(o1, o2, rtol=1e-4, atol=1e-5)
    assert len(l1) == len(l2) >= 4
    for n in l2:
        torch.testing.assert_close(l1[n], l2[n], rtol=1e-4, atol=1e-5)
