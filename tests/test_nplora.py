"""``np-lora`` against dense float64 references written here (the only dense SVDs are in this file)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli
from test_strategies_classic import N1, N2, N3, NAMES, make  # the same three UNet layers and random factors

import lora_merge as lm
from lora_merge.errors import MissingModuleWarning, UsageError
from lora_merge.strategies import get_strategy

D_OUT, D_IN = 16, 12  # make()'s layer shape
RC, RS = 4, 3  # content and style ranks
W = (0.8, 1.3)  # user weights (content, style)


@pytest.fixture
def files(tmp_path):
    """(content, style) written with ``lora_merge.save``: rank 4 alpha 2, rank 3 alpha 5."""
    c = lm.save(make(1, RC, 2.0), tmp_path / "content.safetensors", to="diffusers")
    s = lm.save(make(2, RS, 5.0), tmp_path / "style.safetensors", to="diffusers")
    return [c, s]


def dense(path, name, w):
    """``w · (alpha/r) · B · A`` in float64 from the stored file."""
    m = lm.load(path)[name]
    r = m.down.shape[0]
    return w * (m.alpha / r) * m.up.load().double().reshape(D_OUT, r) @ m.down.load().double().reshape(r, D_IN)


def top_right(delta, k):
    """Top-``k`` right singular vectors (columns) of a dense matrix; k = 0: its numerical rank."""
    _, s, vh = torch.linalg.svd(delta, full_matrices=False)
    n = int((s > s[0] * max(delta.shape) * 1e-12).sum())
    return vh[: (n if k == 0 else k)].T


def soft(delta, v, mu):
    c = 1.0 if math.isinf(mu) else mu / (1 + mu)
    return delta @ (torch.eye(D_IN, dtype=delta.dtype) - c * v @ v.T)


def ref(files, name, mu, k, symmetric=False):
    dc, ds = dense(files[0], name, W[0]), dense(files[1], name, W[1])
    out = soft(dc, top_right(ds, k), mu)
    return out + (soft(ds, top_right(dc, k), mu) if symmetric else ds)


def got(res, name):
    return res.adapter[name].delta(torch.float64).reshape(D_OUT, D_IN)


def close(a, b, tol=1e-5):
    assert float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12) < tol


def merge(files, **params):
    if math.isinf(params.get("mu", 0.0)):  # the paper's μ = ∞ is --hard
        params = {**params, "hard": True}
        del params["mu"]
    return lm.merge(files, strategy="np-lora", weights=list(W), params=params)


@pytest.mark.parametrize("mu,k", [(0.5, 0), (3.0, 0), (0.5, 2), (10.0, 1), (math.inf, 0)])
def test_matches_dense_reference(files, mu, k):
    res = merge(files, mu=mu, k=k)
    for n in NAMES:
        close(got(res, n), ref(files, n, mu, k))


@pytest.mark.parametrize("mu,k", [(0.5, 0), (2.0, 2)])
def test_symmetric_matches_dense_reference(files, mu, k):
    res = merge(files, mu=mu, k=k, symmetric=True)
    for n in NAMES:
        close(got(res, n), ref(files, n, mu, k, symmetric=True))
    plain = merge(files, mu=mu, k=k)
    assert float((got(res, N1) - got(plain, N1)).abs().max()) > 1e-3  # the style is projected too


def test_default_is_paper_setting(files):
    cls = get_strategy("np-lora")
    assert {p.name: p.default for p in cls.params} == {"mu": 0.5, "hard": False, "k": 0, "symmetric": False}
    res = lm.merge(files, strategy="np-lora", weights=list(W))
    for n in NAMES:
        close(got(res, n), ref(files, n, 0.5, 0))
        assert res.report["layers"][n]["style_directions"] == RS


def test_mu_zero_is_the_linear_merge(files):
    res = merge(files, mu=0.0)
    lin = lm.merge(files, strategy="linear", weights=list(W))
    for n in NAMES:
        close(got(res, n), got(lin, n), 1e-6)
        close(got(res, n), dense(files[0], n, W[0]) + dense(files[1], n, W[1]))


@pytest.mark.parametrize("k", [0, 2])
def test_large_mu_keeps_the_style_subspace(files, k):
    for mu in (1e8, math.inf):
        res = merge(files, mu=mu, k=k)
        for n in NAMES:
            dc, ds = dense(files[0], n, W[0]), dense(files[1], n, W[1])
            v = top_right(ds, k)
            err = (got(res, n) @ v - ds @ v).norm() / (dc @ v).norm()
            assert float(err) < 1e-5, (mu, n, float(err))
            # and outside the subspace the content is untouched
            p_perp = torch.eye(D_IN, dtype=torch.float64) - v @ v.T
            close(got(res, n) @ p_perp, (dc + ds) @ p_perp)


def test_hard_ignores_mu_and_equals_the_null_space_projection(files):
    a, b = got(merge(files, hard=True), N3), got(merge(files, hard=True, mu=0.0), N3)
    close(a, b, 1e-7)
    dc, ds = dense(files[0], N3, W[0]), dense(files[1], N3, W[1])
    v = top_right(ds, 0)
    close(a, ds + dc @ (torch.eye(D_IN, dtype=torch.float64) - v @ v.T))


def test_mu_interpolates(files):
    """‖ΔW_c's part in the style subspace‖ after merging is 1/(1+μ) of the original."""
    dc, ds = dense(files[0], N2, W[0]), dense(files[1], N2, W[1])
    v = top_right(ds, 0)
    for mu in (0.25, 1.0, 4.0):
        kept = (got(merge(files, mu=mu), N2) - ds) @ v
        close(kept, dc @ v / (1 + mu))


def test_output_rank_is_rc_plus_rs(files, tmp_path):
    for params in ({}, {"k": 1}, {"symmetric": True}, {"mu": math.inf}):
        res = merge(files, **params)
        for n in NAMES:
            assert res.adapter[n].rank == RC + RS
            assert res.report["layers"][n]["rank"] == RC + RS and "refactored" not in res.report["layers"][n]
    # written and read back: still rank r_c + r_s, same ΔW
    out = tmp_path / "out.safetensors"
    res = lm.merge(files, out, strategy="np-lora", weights=list(W))
    back = lm.load(out)
    for n in NAMES:
        assert back[n].rank == RC + RS
        close(back[n].delta(torch.float64).reshape(D_OUT, D_IN), ref(files, n, 0.5, 0))
    # --rank K re-factors (engine), as for every factor strategy
    small = lm.merge(files, strategy="np-lora", weights=list(W), rank=3)
    assert all(small.adapter[n].rank == 3 for n in NAMES)


def test_missing_module_in_one_input(tmp_path):
    """A layer only the content has is the content alone (no style subspace); one only the style has is
    the style alone; the rank is that input's."""
    c = lm.save(make(1, RC, 2.0, names=(N1, N2)), tmp_path / "c.safetensors", to="diffusers")
    s = lm.save(make(2, RS, 5.0, names=(N2, N3)), tmp_path / "s.safetensors", to="diffusers")
    with pytest.warns(MissingModuleWarning):
        res = lm.merge([c, s], strategy="np-lora", weights=list(W), params={"mu": 2.0})
    close(got(res, N1), dense(c, N1, W[0]))
    close(got(res, N3), dense(s, N3, W[1]))
    assert res.adapter[N1].rank == RC and res.adapter[N3].rank == RS
    close(got(res, N2), ref([c, s], N2, 2.0, 0))


def test_order_is_content_then_style(files):
    a = got(merge(files, mu=2.0), N1)
    b = got(lm.merge(files[::-1], strategy="np-lora", weights=list(W[::-1]), params={"mu": 2.0}), N1)
    assert float((a - b).abs().max()) > 1e-3  # asymmetric: the second input is the protected style


@pytest.mark.parametrize(
    "params,match",
    [
        ({"mu": -0.1}, "mu"),
        ({"mu": "nan"}, "mu"),
        ({"mu": "inf"}, "hard=True"),
        ({"mu": "strong"}, "mu"),
        ({"k": -1}, "'k'"),
        ({"k": "1.5"}, "'k'"),
        ({"symmetric": "maybe"}, "symmetric"),
        ({"rank": 4}, "no parameter 'rank'"),
    ],
)
def test_bad_params_are_usage_errors(files, params, match):
    with pytest.raises(UsageError, match=match):
        lm.merge(files, strategy="np-lora", params=params)


def test_needs_exactly_two_inputs(files, tmp_path):
    third = lm.save(make(3, 2, None), tmp_path / "third.safetensors", to="diffusers")
    for ins in (files[:1], [*files, third]):
        with pytest.raises(UsageError, match="2"):
            lm.merge(ins, strategy="np-lora")


def test_cli_strategies_json_and_merge(files, tmp_path, capsys):
    code, out, _ = run_cli(["strategies", "np-lora", "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["name"] == "np-lora" and {p["option"] for p in info["params"]} == {"--mu", "--hard", "--k", "--symmetric"}
    target = tmp_path / "cli.safetensors"
    code, _, err = run_cli(["merge", *files, "-o", target, "-s", "np-lora", "--weights", "0.8,1.3", "--mu", "3",
                            "--symmetric"], capsys)
    assert code == 0, err
    back = lm.load(target)
    for n in NAMES:
        assert back[n].rank == RC + RS
        close(back[n].delta(torch.float64).reshape(D_OUT, D_IN), ref(files, n, 3.0, 0, symmetric=True))
    code, _, err = run_cli(["merge", *files, "-o", tmp_path / "bad.safetensors", "-s", "np-lora", "--mu", "-1"],
                           capsys)
    assert code != 0 and "mu" in err
