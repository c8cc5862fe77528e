"""K-LoRA (lora_merge/sampling_time/klora.py): the per-layer choice against a direct computation, the schedule at the
timesteps real diffusers schedulers hand the UNet (10/25/50 steps, DDIM and Euler), the hooked output
against the weights with ΔW folded in, detach, the sampler's ``merger=`` and the CLI's answers."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lora_merge.adapter import Adapter, LoraModule
from lora_merge.errors import UsageError
from lora_merge.klora import KLoRA, choose, style_scale, topk_abs_sum

torch.set_num_threads(1)

diffusers = pytest.importorskip("diffusers")

UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}
SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()


def _targets(unet):
    """(name, module) of every attention projection and one conv of the tiny UNet."""
    out = []
    for name, mod in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")) and isinstance(
                mod, torch.nn.Linear):
            out.append((name, mod))
    out.append(("down_blocks.0.resnets.0.conv1", unet.down_blocks[0].resnets[0].conv1))
    return out


def _adapter(unet, rank, seed, scale=1.0, alpha=None, skip=()):
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="diffusers")
    for i, (name, mod) in enumerate(_targets(unet)):
        if i in skip:
            continue
        w = mod.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
        up_shape = (w.shape[0], rank, 1, 1) if w.dim() == 4 else (w.shape[0], rank)
        # per-layer magnitudes that differ, so the choice differs between layers
        up = torch.randn(*up_shape, generator=g) * scale * float(torch.rand((), generator=g) * 2 + 0.1)
        full = "unet." + name
        ad.modules[full] = LoraModule.from_tensors(full, down, up, alpha)
    return ad


def _inputs():
    g = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(2, 3, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 4, 8, generator=g)}


def _folded(unet, ad, weight=1.0):
    out = copy.deepcopy(unet)
    mods = dict(out.named_modules())
    with torch.no_grad():
        for name, m in ad.modules.items():
            w = mods[name[len("unet."):]].weight
            w += weight * m.delta(torch.float64, flat=False)
    return out


def _direct(m_c, m_s, w=(1.0, 1.0)):
    """S_c, S_s straight from dense ΔW and torch.topk on the flattened |ΔW| (K = r_c·r_s)."""
    k = m_c.rank * m_s.rank
    d_c = (w[0] * m_c.scale * (m_c.up.tensor.reshape(m_c.out_features, -1) @ m_c.down.tensor.reshape(m_c.rank, -1)))
    d_s = (w[1] * m_s.scale * (m_s.up.tensor.reshape(m_s.out_features, -1) @ m_s.down.tensor.reshape(m_s.rank, -1)))
    return (torch.topk(d_c.abs().flatten(), k).values.sum().item(),
            torch.topk(d_s.abs().flatten(), k).values.sum().item())


# ------------------------------------------------------------------------------------------ the math
def test_topk_abs_sum_and_schedule():
    d = torch.tensor([[1.0, -5.0], [3.0, -2.0]])
    assert topk_abs_sum(d, 2) == 8.0 and topk_abs_sum(d, 99) == 11.0
    # σ = 1.5·(1 − t/T) + 0.5: 0.5 at pure noise, 2 at the clean end; content early, style late
    assert style_scale(1000, 1000) == 0.5 and style_scale(0, 1000) == 2.0
    assert style_scale(500, 1000) == pytest.approx(1.25)
    assert choose(1.0, 1.0, 999, 1000, gamma=1.0) == "content"
    assert choose(1.0, 1.0, 0, 1000, gamma=1.0) == "style"


def test_per_layer_choice_matches_direct_computation(unet):
    c = _adapter(unet, 4, 10, alpha=2.0)
    s = _adapter(unet, 2, 20, scale=1.5)
    w = (0.8, 1.3)
    k = KLoRA(c, s, gamma="auto", weights=w)
    direct = {n[len("unet."):]: _direct(c[n], s[n], w) for n in c.modules}
    gamma = sum(v[0] for v in direct.values()) / sum(v[1] for v in direct.values())
    assert k.gamma == pytest.approx(gamma, rel=1e-5)
    seen = set()
    for t in (999, 700, 400, 100, 0):
        sig = 1.5 * (1 - t / 1000) + 0.5
        for name, (sc, ss) in direct.items():
            assert k.scores()[name]["score_content"] == pytest.approx(sc, rel=1e-5)
            assert k.scores()[name]["score_style"] == pytest.approx(ss, rel=1e-5)
            want = "content" if sc >= gamma * sig * ss else "style"
            assert k.choice(name, t, 1000) == want, (name, t)
            seen.add(want)
    assert seen == {"content", "style"}  # the test exercises both branches


# ------------------------------------------------------------------------------------------ real timesteps
def _scheduler(kind):
    if kind == "ddim":
        return diffusers.DDIMScheduler(**SCHED)
    return diffusers.EulerDiscreteScheduler(**SCHED)


@pytest.mark.parametrize("kind", ["ddim", "euler"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_schedule_follows_the_sampler_timesteps(unet, kind, steps):
    c, s = _adapter(unet, 4, 11), _adapter(unet, 4, 21)
    sched = _scheduler(kind)
    sched.set_timesteps(steps)
    kl = KLoRA.attach(unet, c, s, scheduler=sched)
    seen = []
    h = unet.register_forward_pre_hook(lambda m, a, kw: seen.append(float(kw.get("timestep", a[1] if len(a) > 1
                                                                                     else float("nan")))),
                                       with_kwargs=True)
    try:
        inp = _inputs()
        x = inp["sample"][:1]
        with torch.no_grad():
            x = x * sched.init_noise_sigma
            for t in sched.timesteps:
                xin = sched.scale_model_input(x, t)
                out = unet(xin, t, encoder_hidden_states=inp["encoder_hidden_states"][:1]).sample
                x = sched.step(out, t, x).prev_sample
    finally:
        h.remove()
        kl.detach()
    assert len(kl.records) == steps == len(seen)
    direct = {n[len("unet."):]: _direct(c[n], s[n]) for n in c.modules}
    for rec, t in zip(kl.records, seen):
        assert rec.timestep == pytest.approx(t)
        sig = 1.5 * (1 - t / 1000) + 0.5
        for name, (sc, ss) in direct.items():
            assert rec.choices[name] == ("content" if sc >= kl.gamma * sig * ss else "style"), (name, t)
    # the direction: layers on content can only shrink as sampling proceeds (σ grows monotonically)
    counts = [r.counts["content"] for r in kl.records]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


# ------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("winner", ["content", "style"])
def test_output_equals_folded_weights_and_detach_restores(unet, winner):
    # in float64, so "equal" is 1e-10, not fp32 rounding carried through the network's norms
    unet = copy.deepcopy(unet).double()
    c, s = _adapter(unet, 4, 12, alpha=8.0), _adapter(unet, 3, 22)
    w = (0.7, 1.2)
    inp = {k: v.double() for k, v in _inputs().items()}
    t = torch.tensor([500, 500])
    with torch.no_grad():
        base = unet(timestep=t, **inp).sample
    ref_ad, ref_w = (c, w[0]) if winner == "content" else (s, w[1])
    with torch.no_grad():
        want = _folded(unet, ref_ad, ref_w)(timestep=t, **inp).sample
    gamma = 1e-9 if winner == "content" else 1e9
    kl = KLoRA.attach(unet, c, s, gamma=gamma, weights=w)
    with torch.no_grad():
        hooked = unet(inp["sample"], t, encoder_hidden_states=inp["encoder_hidden_states"]).sample
    assert set(kl.records[-1].choices.values()) == {winner}
    torch.testing.assert_close(hooked, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(hooked, base, atol=1e-3)
    kl.detach()
    kl.detach()  # idempotent
    with torch.no_grad():
        after = unet(timestep=t, **inp).sample
    assert torch.equal(after, base)
    assert not unet._forward_hooks and not unet._forward_pre_hooks


def test_layers_in_one_adapter_only_and_errors(unet):
    c = _adapter(unet, 2, 13)
    s = _adapter(unet, 2, 23, skip=(0, 1))
    kl = KLoRA(c, s)
    only = {n for n, v in kl.scores().items() if v["only"] == "content"}
    assert len(only) == 2
    with torch.no_grad(), kl.attach(unet):
        unet(timestep=100, **_inputs())
        assert all(kl.records[-1].choices[n] == "content" for n in only)
    assert not kl.attached
    inp = _inputs()
    with KLoRA.attach(unet, c, s) as k2, pytest.raises(UsageError, match="different timesteps"):
        unet(timestep=torch.tensor([10, 20]), **inp)
    assert not k2.attached
    bad = Adapter(modules={"unet.nope.to_q": c["unet." + _targets(unet)[0][0]]})
    with pytest.raises(UsageError, match="no module"):
        KLoRA.attach(unet, bad, bad)
    with pytest.raises(UsageError, match="lora_merge.load"):
        KLoRA("a.safetensors", c)  # type: ignore[arg-type]


def test_toyworld_sample_with_a_merger(unet, monkeypatch):
    from lora_merge.toyworld import sampling

    class World:  # just what sample() touches
        device = "cpu"
        image_size = 8
        def __init__(self, u):
            self.unet = u
            self.config: dict = {}

        def encode_prompt(self, ps):
            return torch.ones(len(ps), 4, 8)

    monkeypatch.setattr(sampling, "ddim_scheduler", lambda cfg=None: diffusers.DDIMScheduler(**SCHED))
    world = World(unet)
    c, s = _adapter(unet, 2, 14), _adapter(unet, 2, 24)
    plain = sampling.sample(world, "a", [1, 2], steps=4)
    again = sampling.sample(world, "a", [1, 2], steps=4, merger=None)
    assert torch.equal(plain, again)
    kl = KLoRA(c, s)
    mixed = sampling.sample(world, "a", [1, 2], steps=4, merger=kl)
    assert not kl.attached and len(kl.records) == 4
    assert [r.timestep for r in kl.records] == [750.0, 500.0, 250.0, 0.0]
    assert not torch.equal(mixed, plain)
    assert torch.equal(sampling.sample(world, "a", [1, 2], steps=4), plain)  # nothing left behind


# ------------------------------------------------------------------------------------------ CLI
def test_cli_lists_k_lora_apart_and_merge_refuses_it(tmp_path):
    from click.testing import CliRunner

    from lora_merge.cli.merge_cmd import merge
    from lora_merge.cli.strategies_cmd import strategies

    r = CliRunner()
    listed = json.loads(r.invoke(strategies, ["--json"]).output)
    assert "k-lora" not in {i["name"] for i in listed}  # not a merge strategy
    st = json.loads(r.invoke(strategies, ["--sampling-time", "--json"]).output)["sampling_time"]
    assert st[0]["name"] == "k-lora" and st[0]["static_file"] is False
    assert {p["name"] for p in st[0]["params"]} >= {"gamma", "weights"}
    text = r.invoke(strategies, [], env={"COLUMNS": "200"}).output
    assert "sampling-time mergers" in text and "k-lora" in text
    one = r.invoke(strategies, ["k-lora"], env={"COLUMNS": "200"}).output
    assert "cannot be saved" in one
    res = r.invoke(merge, ["a.safetensors", "b.safetensors", "-s", "k-lora", "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code != 0 and isinstance(res.exception, UsageError)
    assert "sampling-time method" in str(res.exception) and "KLoRA.attach" in str(res.exception)
    assert "\n" not in str(res.exception)
