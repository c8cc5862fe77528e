"""Classic strategies against straightforward dense references written here."""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule
from lora_merge.errors import MergeError, MissingModuleWarning, UsageError
from lora_merge.strategies import available_strategies, get_strategy

N1 = "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
N2 = "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v"
N3 = "unet.down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2"
NAMES = (N1, N2, N3)


def make(seed, r=4, alpha=None, names=NAMES, d_out=16, d_in=12):
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="diffusers")
    for n in names:
        ad.modules[n] = LoraModule.from_tensors(
            n, torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), alpha
        )
    return ad


def tau(m: LoraModule) -> torch.Tensor:
    """Unweighted ΔW = (alpha/r)·B·A, fp64, from the raw tensors."""
    r = m.down.shape[0]
    s = (m.alpha if m.alpha is not None else r) / r
    return s * m.up.tensor.double() @ m.down.tensor.double()


def got(res, name) -> torch.Tensor:
    return res.adapter[name].delta(torch.float64)


def close(a, b, tol=1e-5):
    scale = max(float(b.abs().max()), 1e-12)
    assert float((a - b).abs().max()) / scale < tol


# ---------------------------------------------------------------- dense references (the papers' recipes)
def ref_trim(t, density):
    k = int(density * t.numel())
    out = torch.zeros_like(t)
    if k:
        thr = t.abs().flatten().sort(descending=True).values[k - 1]
        out[t.abs() >= thr] = t[t.abs() >= thr]
    return out


def ref_disjoint(taus, weights, sign="weighted", divide="count"):
    out = torch.zeros_like(taus[0])
    for idx in range(out.numel()):
        vals = [float(t.flatten()[idx]) for t in taus]
        votes = [w * v if sign == "weighted" else v for w, v in zip(weights, vals)]
        total_vote = sum(votes)
        elected = (total_vote > 0) - (total_vote < 0)
        agree = [i for i, v in enumerate(votes) if v != 0 and ((v > 0) - (v < 0)) == elected]
        s = sum(weights[i] * vals[i] for i in agree)
        if divide == "count":
            s = s / max(len(agree), 1)
        elif divide == "weights":
            ws = sum(weights[i] for i in agree)
            s = s / ws if ws != 0 else 0.0
        out.view(-1)[idx] = s
    return out


# ---------------------------------------------------------------- single input reproduces ΔW
SINGLE = [
    ("linear", {}),
    ("svd", {}),
    ("ties", {"density": 1.0}),
    ("dare", {"density": 1.0}),
    ("dare", {"density": 1.0, "variant": "ties"}),
    ("magnitude-prune", {"density": 1.0}),
    ("blocks", {"take": "1:*"}),
]


@pytest.mark.parametrize("name,params", SINGLE)
def test_single_input_weight_one_reproduces_delta(name, params):
    a = make(1, r=4, alpha=2.5)
    res = lm.merge([a], strategy=name, params=params)
    for n in NAMES:
        close(got(res, n), tau(a[n]), 1e-5)


def test_every_builtin_covered_by_single_input_test():
    builtin = {"linear", "svd", "ties", "dare", "magnitude-prune", "blocks"}
    assert builtin <= set(available_strategies())
    assert {n for n, _ in SINGLE} == builtin


# ---------------------------------------------------------------- svd
def test_svd_full_rank_is_exact_and_truncates():
    a, b = make(1, r=4, alpha=8.0), make(2, r=6)
    w = [0.6, -1.2]
    exact = {n: w[0] * tau(a[n]) + w[1] * tau(b[n]) for n in NAMES}
    res = lm.merge([a, b], strategy="svd", weights=w)
    for n in NAMES:
        close(got(res, n), exact[n])
        assert res.adapter[n].rank == 10
    res3 = lm.merge([a, b], strategy="svd", weights=w, rank=3)
    for n in NAMES:
        u, s, vh = torch.linalg.svd(exact[n])
        close(got(res3, n), (u[:, :3] * s[:3]) @ vh[:3])
    half = lm.merge([a, b], strategy="svd", weights=w, params={"energy": 0.5})
    for n in NAMES:
        s = torch.linalg.svdvals(exact[n])
        e = torch.cumsum(s**2, 0) / (s**2).sum()
        assert half.adapter[n].rank == int((e < 0.5).sum()) + 1
    up = lm.merge([a, b], strategy="svd", weights=w, params={"split": "up"})
    close(got(up, N1), exact[N1])


# ---------------------------------------------------------------- ties
@pytest.mark.parametrize("sign", ["weighted", "unweighted"])
@pytest.mark.parametrize("divide", ["count", "weights", "none"])
def test_ties_matches_dense_reference(sign, divide):
    ins = [make(1, r=3, alpha=6.0), make(2, r=5), make(3, r=2, alpha=1.0)]
    w = [0.9, -0.4, 0.6]
    res = lm.merge(ins, strategy="ties", weights=w, params={"density": 0.3, "sign": sign, "divide": divide},
                   full_rank=True)
    for n in NAMES:
        taus = [ref_trim(tau(x[n]), 0.3) for x in ins]
        close(got(res, n), ref_disjoint(taus, w, sign, divide), 1e-4)


def test_ties_sign_choice_matters():
    ins = [make(1), make(2)]
    w = [1.0, -3.0]
    a = lm.merge(ins, strategy="ties", weights=w, params={"density": 1.0, "sign": "weighted"}, full_rank=True)
    b = lm.merge(ins, strategy="ties", weights=w, params={"density": 1.0, "sign": "unweighted"}, full_rank=True)
    assert not torch.allclose(got(a, N1), got(b, N1))


# ---------------------------------------------------------------- dare
def ref_dare_mask(seed, name, i, shape, density):
    import hashlib

    h = hashlib.sha256(f"{seed}:{name}:input{i}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.rand(shape, generator=g) < density


@pytest.mark.parametrize("variant", ["linear", "ties"])
def test_dare_matches_dense_reference(variant):
    ins = [make(1, r=3, alpha=6.0), make(2, r=5)]
    w = [0.7, 0.5]
    res = lm.merge(ins, strategy="dare", weights=w, seed=11, params={"density": 0.4, "variant": variant},
                   full_rank=True)
    for n in NAMES:
        taus = [tau(x[n]) * ref_dare_mask(11, n, i, (16, 12), 0.4) / 0.4 for i, x in enumerate(ins)]
        ref = sum(wi * t for wi, t in zip(w, taus)) if variant == "linear" else ref_disjoint(taus, w)
        close(got(res, n), ref, 1e-4)


def test_dare_seeded_bit_identical_and_seed_matters():
    ins = [make(1), make(2)]
    r1 = lm.merge(ins, strategy="dare", seed=5, params={"density": 0.3})
    r2 = lm.merge(ins, strategy="dare", seed=5, params={"density": 0.3})
    r3 = lm.merge(ins, strategy="dare", seed=6, params={"density": 0.3})
    for n in NAMES:
        assert torch.equal(r1.adapter[n].up.tensor, r2.adapter[n].up.tensor)
        assert torch.equal(r1.adapter[n].down.tensor, r2.adapter[n].down.tensor)
    assert not torch.allclose(got(r1, N1), got(r3, N1))


def test_dare_density_zero_is_zero_not_nan():
    res = lm.merge([make(1), make(2)], strategy="dare", params={"density": 0.0})
    for n in NAMES:
        d = got(res, n)
        assert torch.isfinite(d).all() and float(d.abs().max()) == 0.0


# ---------------------------------------------------------------- magnitude-prune
def test_magnitude_prune_keeps_top_entries_of_weighted_sum():
    a, b = make(1, alpha=2.0), make(2)
    w = [0.5, 1.5]
    res = lm.merge([a, b], strategy="magnitude-prune", weights=w, params={"density": 0.25}, full_rank=True)
    for n in NAMES:
        total = w[0] * tau(a[n]) + w[1] * tau(b[n])
        close(got(res, n), ref_trim(total, 0.25), 1e-4)
        assert res.report["layers"][n]["kept"] == int(0.25 * 16 * 12)


# ---------------------------------------------------------------- blocks
def test_blocks_b_lora_preset_takes_content_and_style_blocks():
    c, s = make(1, alpha=2.0), make(2)
    res = lm.merge([c, s], strategy="blocks", weights=[1.0, 0.8])
    close(got(res, N1), tau(c[N1]))  # up_blocks.0.attentions.0 from input 1 (content)
    close(got(res, N2), 0.8 * tau(s[N2]))  # up_blocks.0.attentions.1 from input 2 (style)
    assert float(got(res, N3).abs().max()) == 0.0  # rest = drop
    assert res.report["strategy"]["layers_taken_per_input"] == {"1": 1, "2": 1}
    summed = lm.merge([c, s], strategy="blocks", params={"rest": "sum"})
    close(got(summed, N3), tau(c[N3]) + tau(s[N3]))
    second = lm.merge([c, s], strategy="blocks", params={"take": "2:down_blocks.2", "rest": "1"})
    close(got(second, N3), tau(s[N3]))
    close(got(second, N1), tau(c[N1]))


def test_blocks_errors():
    c, s = make(1, names=(N3,)), make(2, names=(N3,))
    with pytest.raises(MergeError, match="matches no module of input 1"):
        lm.merge([c, s], strategy="blocks", params={"preset": "b-lora-sdxl"})
    with pytest.raises(UsageError, match="input 3 does not exist"):
        lm.merge([c, s], strategy="blocks", params={"take": "3:down_blocks"})
    with pytest.raises(UsageError, match="not one of"):
        lm.merge([c, s], strategy="blocks", params={"preset": "nope"})


def test_blocks_sd1_preset():
    n = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingModuleWarning)
        res = lm.merge(
            [make(1, names=(N1, "unet.up_blocks.1.attentions.0.proj_in")), make(2, names=(n,))],
            strategy="blocks",
            params={"preset": "b-lora-sd1"},
        )
    assert res.report["layers"][n]["from_inputs"] == [2]
    assert res.report["layers"]["unet.up_blocks.1.attentions.0.proj_in"]["from_inputs"] == [1]


def test_params_are_declared_once():
    for cls in available_strategies().values():
        d = cls.describe()
        assert d["name"] and d["description"] and isinstance(d["exact"], bool)
        assert len({p["name"] for p in d["params"]}) == len(d["params"])
    assert get_strategy("linear").exact and not get_strategy("ties").exact


def test_topk_mask_is_the_topk_set_and_breaks_ties_by_position():
    from lora_merge.strategies.taskvectors import topk_mask

    g = torch.Generator().manual_seed(4)
    for shape, density in (((320, 768), 0.2), ((64, 64), 0.01), ((17, 5), 0.7)):
        t = torch.randn(*shape, generator=g)
        want = torch.zeros(t.numel(), dtype=torch.bool)
        want[torch.topk(t.abs().flatten(), int(density * t.numel())).indices] = True
        assert torch.equal(topk_mask(t, density), want.view_as(t))
    t = torch.zeros(100)
    t[:10] = torch.arange(1.0, 11.0)  # 10 non-zeros, then 90 equal zeros: the first 10 zeros fill up to k
    m = topk_mask(t, 0.2)
    assert int(m.sum()) == 20 and bool(m[:20].all()) and not bool(m[20:].any())
    assert not topk_mask(t, 0.0).any() and topk_mask(t, 1.0).all()
