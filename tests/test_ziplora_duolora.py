"""``ziplora`` and ``duolora`` through the strategy interface and the engine."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch
from conftest import REPO, shared_fixture

import lora_merge as lm
from lora_merge.adapter import Adapter, LoraModule
from lora_merge.analysis.fidelity import evaluate, retention
from lora_merge.errors import OutputExistsError
from lora_merge.strategies import LayerContext, LayerInput, get_strategy

BLOCKS = ["unet.down_blocks.1.attentions.0", "unet.down_blocks.2.attentions.0", "unet.mid_block.attentions.0",
          "unet.up_blocks.0.attentions.1", "unet.up_blocks.1.attentions.2"]  # fmt: skip


def _pair(overlap: float, layers: int = 10, d_out: int = 48, d_in: int = 64, r: int = 8, seed: int = 0):
    """Two adapters whose input directions share ``overlap`` of the style LoRA's rank."""
    g = torch.Generator().manual_seed(seed)
    c, s = Adapter(dialect="diffusers"), Adapter(dialect="diffusers")
    k = round(r * overlap)
    for i in range(layers):
        name = f"{BLOCKS[i % len(BLOCKS)]}.transformer_blocks.{i}.attn1.to_q"
        basis = torch.linalg.qr(torch.randn(d_in, 2 * r, generator=g))[0].T
        ac = torch.randn(r, r, generator=g) @ basis[:r]
        as_ = torch.randn(r, r, generator=g) @ torch.cat([basis[:k], basis[r:2 * r - k]])
        c.modules[name] = LoraModule.from_tensors(name, ac, torch.randn(d_out, r, generator=g) * 0.1, alpha=r / 2)
        s.modules[name] = LoraModule.from_tensors(name, as_, torch.randn(d_out, r, generator=g) * 0.1, alpha=r)
    return c, s


def _merge(c, s, strategy, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lm.merge([c, s], None, strategy=strategy, arch=kw.pop("arch", "sdxl"), **kw).adapter


def test_registered_with_two_inputs_and_their_parameters():
    z, d = get_strategy("ziplora"), get_strategy("duolora")
    assert z.min_inputs == z.max_inputs == d.min_inputs == d.max_inputs == 2
    zp = {p["name"]: p for p in z.describe()["params"]}
    dp = {p["name"]: p for p in d.describe()["params"]}
    assert zp["axis"]["default"] == "out" and zp["lambda_sim"]["default"] == 0.01
    assert dp["lambda_prior"]["default"] == 0.01 and dp["lambda_cycle"]["default"] == 0.01 and dp["lr"]["default"] == 0.01
    assert zp["input_model"]["choices"] == ["subspace", "identity", "stats"]
    with pytest.raises(lm.UsageError, match="takes 2"):
        lm.merge([_pair(0)[0]], None, strategy="ziplora")


@pytest.mark.parametrize("strategy,params", [
    ("ziplora", {"closed_form": False, "steps": 0}),
    ("ziplora", {"closed_form": False, "steps": 0, "axis": "in"}),
    ("duolora", {"closed_form": False, "steps": 0, "prior_init": False}),
])  # fmt: skip
def test_all_ones_masks_reproduce_the_direct_merge(strategy, params):
    c, s = _pair(0.5, layers=3)
    lin = _merge(c, s, "linear", weights=[0.8, 1.2])
    out = _merge(c, s, strategy, weights=[0.8, 1.2], params=params)
    for name, m in lin.modules.items():
        torch.testing.assert_close(out[name].delta(), m.delta(), rtol=1e-5, atol=1e-6)
        assert out[name].rank == m.rank == 16 and out[name].alpha == 16  # scale folded, alpha = rank


@pytest.mark.parametrize("strategy", ["ziplora", "duolora"])
def test_orthogonal_inputs_keep_both_loras(strategy):
    c, s = _pair(0.0, layers=5)
    res = evaluate(c, s, _merge(c, s, strategy))
    assert res["mean"]["content"] > 0.98 and res["mean"]["style"] > 0.98
    lin = evaluate(c, s, _merge(c, s, "linear"))
    assert lin["mean"]["joint"] == pytest.approx(1.0, abs=1e-5)


def _tensor_bytes(path):
    """Every tensor's bytes and the metadata (safetensors orders the metadata of the header arbitrarily,
    so the file bytes themselves can differ between two identical writes)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("strategy,params", [("ziplora", {}), ("ziplora", {"axis": "in", "steps": 20}),
                                             ("duolora", {"closed_form": False, "steps": 30})])  # fmt: skip
def test_same_seed_same_bytes(strategy, params, tmp_path):
    c, s = _pair(0.5, layers=4)
    paths = []
    for i, seed in enumerate([3, 3, 4]):
        p = tmp_path / f"{i}.safetensors"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm.merge([c, s], p, strategy=strategy, params=dict(params), seed=seed, arch="sdxl")
        paths.append(_tensor_bytes(p))
    assert paths[0] == paths[1]
    if strategy == "duolora":  # the prior initialization is a seeded draw
        assert paths[0] != paths[2]


def _joint_table(c, s, strategies):
    rows = {}
    for label, strategy, weights, params in strategies:
        rows[label] = evaluate(c, s, _merge(c, s, strategy, weights=weights, params=params))["mean"]["joint"]
    return rows


# the masks as solved (--strength free): the weight-space retention they maximise.  The default
# --strength preserve gives some of it back to keep each LoRA's strength (judged in images, docs/quality.md)
COMPARE = [("linear 1,1", "linear", [1, 1], {}), ("linear .5,.5", "linear", [0.5, 0.5], {}),
           ("ziplora", "ziplora", None, {"strength": "free"}),
           ("duolora", "duolora", None, {"strength": "free"})]  # fmt: skip


def test_half_overlapping_pair_beats_linear_on_joint_retention():
    c, s = _pair(0.5, layers=10)
    j = _joint_table(c, s, COMPARE)
    for ours in ("ziplora", "duolora"):
        assert j[ours] >= j["linear 1,1"] and j[ours] >= j["linear .5,.5"], j


def test_real_sd15_style_pair_beats_linear_on_joint_retention():
    c = lm.load(shared_fixture("sd15/pokemon_style.safetensors"))
    s = lm.load(shared_fixture("sd15/rick_and_morty_style.safetensors"))
    j = _joint_table(c, s, COMPARE)
    for ours in ("ziplora", "duolora"):
        assert j[ours] >= j["linear 1,1"] and j[ours] >= j["linear .5,.5"], j


def test_missing_module_and_unequal_ranks():
    c, s = _pair(0.5, layers=2)
    name = next(iter(s.modules))
    del s.modules[name]
    other = list(c.modules)[1]
    b, a = s.modules[other].factors()
    s.modules[other] = LoraModule.from_tensors(other, a[:5], b[:, :5], alpha=5.0)
    for strategy in ("ziplora", "duolora"):
        out = _merge(c, s, strategy)
        torch.testing.assert_close(out[name].delta(), c[name].delta(), rtol=1e-3, atol=1e-5)  # only content there
        assert out[other].rank == 13


def test_duolora_layer_priors_roles_and_ablation_switches(tmp_path):
    c, s = _pair(0.5, layers=5)
    rep = tmp_path / "r.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm.merge([c, s], None, strategy="duolora", arch="sdxl", report_path=rep)
    data = json.loads(rep.read_text())
    roles = {n: info["role"] for n, info in data["layers"].items()}
    assert roles["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == "style"
    assert roles["unet.mid_block.attentions.0.transformer_blocks.2.attn1.to_q"] == "content"
    assert roles["unet.up_blocks.0.attentions.1.transformer_blocks.3.attn1.to_q"] == "content"
    assert data["strategy"]["priors"]["layers_by_role"] == {"content": 3, "style": 2}
    layer = data["layers"]["unet.mid_block.attentions.0.transformer_blocks.2.attn1.to_q"]
    assert len(layer["mask_content"]) == 8 and "retention" in layer and layer["loss"]["final"]["prior"] > 0
    # b-lora preset: only up_blocks.0.attentions.{0,1} get a role
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lm.merge([c, s], None, strategy="duolora", params={"priors": "b-lora"}, arch="sdxl")
    assert {i["role"] for i in res.report["layers"].values()} == {"neutral", "style"}
    # the ablation: every term can be switched off; with all off duolora = the plain ZipRank closed form
    off = {"lambda_prior": 0.0, "lambda_cycle": 0.0, "lambda_sim": 0.0, "prior_init": False}
    res = lm.merge([c, s], None, strategy="duolora", params=off, arch="sdxl")
    for info in res.report["layers"].values():
        assert info["loss"]["final"]["total"] == pytest.approx(
            info["loss"]["final"]["recon_content"] + info["loss"]["final"]["recon_style"])
    # unknown architecture: a warning, not a silent fallback
    with pytest.warns(UserWarning, match="architecture is unknown"):
        lm.merge([c, s], None, strategy="duolora", arch=None)
    with pytest.raises(lm.UsageError, match="no layer priors"):
        lm.merge([c, s], None, strategy="duolora", params={"priors": "nonsense"}, arch="sdxl")


def test_report_counts_masks_and_loss_terms(tmp_path):
    c, s = _pair(0.5, layers=5)
    rep = tmp_path / "r.json"
    lm.merge([c, s], None, strategy="ziplora", arch="sdxl", report_path=rep)
    data = json.loads(rep.read_text())["strategy"]
    assert data["trainable_values"] == 5 * 2 * 48 and data["layers"] == 5
    assert set(data["loss_mean"]) == {"init", "closed_form", "final"}
    assert data["loss_mean"]["final"]["total"] <= data["loss_mean"]["init"]["total"]
    assert set(data["blocks"]) == {b.removeprefix("unet.") for b in BLOCKS}


def test_strategy_runs_without_the_engine_on_hand_made_inputs():
    g = torch.Generator().manual_seed(0)
    c = LayerInput(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 0.5, 1.0)
    s = LayerInput(torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g), 1.0, 1.0)
    ctx = LayerContext(name="unet.up_blocks.0.attentions.0.x.to_q", index=0, block="unet.up_blocks.0.attentions.0",
                       arch="sdxl")  # fmt: skip
    for name in ("ziplora", "duolora"):
        strat = get_strategy(name)()
        res = strat.merge_layer([c, s], ctx)
        assert res.up.shape == (6, 5) and res.down.shape == (5, 5)
        r = retention(res.up, res.down, c, s)
        assert -1 < r["content"] <= 1 and -1 < r["style"] <= 1
        assert strat.report()["trainable_values"] == (12 if name == "ziplora" else 5)


# ---------------------------------------------------------------- the SDXL attention layout


@pytest.mark.slow  # builds the SDXL UNet on the meta device and merges 560 layers twice (~10–40 s)
def test_trainable_value_counts_on_the_sdxl_attention_layout(tmp_path):
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from sdxl_pair import sdxl_attention_layout

    layout = sdxl_attention_layout()
    assert len(layout) == 560
    c, s = Adapter(dialect="diffusers"), Adapter(dialect="diffusers")
    for name, (d_out, d_in) in layout.items():  # zero factors: the counts need the shapes only
        c.modules[name] = LoraModule.from_tensors(name, torch.zeros(64, d_in), torch.zeros(d_out, 64))
        s.modules[name] = LoraModule.from_tensors(name, torch.zeros(64, d_in), torch.zeros(d_out, 64))
    fast = {"steps": 0, "closed_form": False}
    counts = {}
    for strategy in ("ziplora", "duolora"):
        rep = tmp_path / f"{strategy}.json"
        lm.merge([c, s], None, strategy=strategy, params=dict(fast), arch="sdxl", report_path=rep)
        counts[strategy] = json.loads(rep.read_text())["strategy"]["trainable_values"]
    assert counts == {"ziplora": 1_331_200, "duolora": 71_680}


# ---------------------------------------------------------------- loaders read the output


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()  # fmt: skip


def _unet_lora(unet, seed, r):
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="diffusers")
    for n, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".attn" in n and n.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            ad.modules["unet." + n] = LoraModule.from_tensors(
                "unet." + n, torch.randn(r, mod.in_features, generator=g) * 0.3,
                torch.randn(mod.out_features, r, generator=g) * 0.3, alpha=r / 2)  # fmt: skip
    return ad


@pytest.mark.parametrize("strategy", ["ziplora", "duolora"])
def test_diffusers_loads_the_output(strategy, tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    base = _tiny_unet()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    a = lm.save(_unet_lora(base, 1, 4), tmp_path / "a.safetensors", to="diffusers")
    b = lm.save(_unet_lora(base, 2, 4), tmp_path / "b.safetensors", to="diffusers")
    res = lm.merge([a, b], tmp_path / "m.safetensors", strategy=strategy, to="diffusers", arch="sdxl")
    merged = lm.load(res.output)
    from safetensors.torch import load_file

    from lora_merge.engine import mask_sidecar_path

    masks = load_file(str(mask_sidecar_path(res.output)))  # the masks are kept next to the output
    assert set(masks) == {f"{n}.mask_{r}" for n in merged.modules for r in ("content", "style")}
    with pytest.raises(OutputExistsError):
        lm.merge([a, b], tmp_path / "m.safetensors", strategy=strategy, to="diffusers", arch="sdxl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = _tiny_unet()
        unet.load_state_dict(state)
        unet.load_lora_adapter(str(res.output), prefix="unet", adapter_name="m")
    from peft.tuners.lora import LoraLayer

    seen = 0
    for n, mod in unet.named_modules():
        if isinstance(mod, LoraLayer):
            torch.testing.assert_close(mod.get_delta_weight("m"), merged["unet." + n].delta(), rtol=1e-5, atol=1e-6)
            seen += 1
    assert seen == len(merged.modules) > 0


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8), "v": torch.nn.Linear(8, 6)}) for _ in range(2))

    def forward(self, x):
        for blk in self.blocks:
            x = blk["q"](x)
        return self.blocks[-1]["v"](x)


@pytest.mark.parametrize("strategy", ["ziplora", "duolora"])
def test_peft_loads_the_output_when_the_inputs_were_peft(strategy, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import LoraLayer

    for i, r in enumerate((4, 2)):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(target_modules=["q", "v"], init_lora_weights=False, r=r, lora_alpha=2 * r)
        peft.get_peft_model(_Tiny(), cfg).save_pretrained(tmp_path / f"in{i}")
    res = lm.merge([tmp_path / "in0", tmp_path / "in1"], tmp_path / "out", strategy=strategy,
                   params={"priors": "none"} if strategy == "duolora" else None)
    merged = lm.load(res.output)
    pm = peft.PeftModel.from_pretrained(_Tiny(), str(res.output))
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    assert set(layers) == set(merged.modules)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.get_delta_weight("default"), merged[name].delta(), rtol=1e-5, atol=1e-6)


def test_cli_ablation_report_and_sidecar(tmp_path):
    from click.testing import CliRunner

    from lora_merge.cli import cli

    c, s = _pair(0.5, layers=3)
    a = lm.save(c, tmp_path / "c.safetensors", to="diffusers")
    b = lm.save(s, tmp_path / "s.safetensors", to="diffusers")
    out, rep = tmp_path / "m.safetensors", tmp_path / "r.json"
    args = ["merge", str(a), str(b), "-s", "duolora", "-o", str(out), "--report", str(rep), "--arch", "sdxl",
            "--lambda-prior", "0", "--lambda-cycle", "0", "--no-prior-init", "--steps", "5"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert ".masks.safetensors" in r.output  # the strategy's own table (its caption)
    data = json.loads(rep.read_text())
    assert data["recipe"]["params"]["lambda_prior"] == 0.0 and data["recipe"]["params"]["prior_init"] is False
    assert data["strategy"]["trainable_values"] == 3 * 16
    assert (tmp_path / "m.safetensors.masks.safetensors").exists()
    r = CliRunner().invoke(cli, ["merge", str(a), str(b), "-s", "ziplora", "--axis", "sideways", "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code != 0


# ------------------------------------------------------------------ strength and presets
def test_preserve_strength_keeps_each_loras_mean_at_one():
    from lora_merge.strategies.pair_masks import preserve_strength

    m = torch.tensor([0.2, 0.6, 1.0])
    torch.testing.assert_close(preserve_strength(m), m / 0.6)
    assert float(preserve_strength(m).mean()) == pytest.approx(1.0)
    assert torch.equal(preserve_strength(torch.zeros(3)), torch.zeros(3))  # a LoRA switched off stays off
    assert preserve_strength(torch.ones(0)).numel() == 0


def test_strength_preserve_is_the_default_and_free_is_the_solved_masks():
    c, s = _pair(0.5)
    for strat in ("ziplora", "duolora"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keep = lm.merge([c, s], None, strategy=strat, arch="sdxl", params={"steps": 5})
            free = lm.merge([c, s], None, strategy=strat, arch="sdxl", params={"steps": 5, "strength": "free"})
        checked = 0
        for name, info in keep.report["layers"].items():
            if "mask_content" not in info:
                continue
            for key in ("mask_content", "mask_style"):
                kept, solved = info[key], free.report["layers"][name][key]
                assert sum(kept) / len(kept) == pytest.approx(1.0, abs=1e-4)
                # the same redistribution: proportional to the solved masks
                ratio = [x / y for x, y in zip(kept, solved) if abs(y) > 1e-3]
                assert max(ratio) - min(ratio) < 1e-3 * max(ratio)
            checked += 1
        assert checked > 0
        # the solved masks do lower the strength (the reason for preserve)
        free_means = [sum(i["mask_content"]) / len(i["mask_content"]) for i in free.report["layers"].values()
                      if "mask_content" in i]
        assert min(free_means) < 0.99


def test_duolora_paper_preset_and_explicit_options_win():
    import json

    from click.testing import CliRunner

    from lora_merge.cli import cli
    from lora_merge.strategies import available_strategies
    from lora_merge.strategies.duolora import PRESETS

    cls = available_strategies()["duolora"]
    paper = cls(preset="paper").config
    for k, v in PRESETS["paper"].items():
        assert paper[k] == v
    assert cls(preset="paper", strength="preserve", lambda_prior=0.5).config["strength"] == "preserve"
    assert cls(preset="paper", lambda_prior=0.5).config["lambda_prior"] == 0.5
    default = cls().config
    declared = {p.name: p.default for p in cls.params}
    assert default == declared  # one default per parameter: the declared one
    r = CliRunner().invoke(cli, ["strategies", "duolora", "--json"])
    doc = json.loads(r.stdout)
    params = {p["name"]: p for p in doc["params"]}
    assert params["preset"]["default"] == "default" and params["preset"]["choices"] == ["default", "paper"]
    assert params["strength"]["default"] == "preserve" and params["prior_init"]["default"] is False
