"""The fast ``--rank K`` route: fp32 Gram matrices (only when the output dtype's rounding dominates their
error), per-input blocks without concatenation, and layers finished on worker threads."""

from __future__ import annotations

import pytest
import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule, linalg
from lora_merge.engine import REFACTOR_TOL
from lora_merge.errors import UsageError

FP16_TOL = REFACTOR_TOL[torch.float16]


def best_rank_k(ups, downs, coeffs, k):
    m = sum(c * u.double() @ d.double() for c, u, d in zip(coeffs, ups, downs))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # dense reference
    return m, (u[:, :k] * s[:k]) @ vh[:k]


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def factors(seed, d_out, d_in, ranks, dtype=torch.float16, up_cond=1.0, down_cond=1.0):
    """Random factors; ``*_cond`` spreads the singular values of the concatenated factor (its Gram's
    condition number is then about ``cond²``), with random column/row scales on top."""
    g = torch.Generator().manual_seed(seed)
    r = sum(ranks)

    def spread(m, n, cond):
        q1, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
        q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return (q1 * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)) @ q2.T

    up = spread(d_out, r, up_cond) * torch.rand(r, generator=g, dtype=torch.float64).add(0.5)
    down = spread(d_in, r, down_cond).T * torch.rand(r, 1, generator=g, dtype=torch.float64).add(0.5)
    offs = [sum(ranks[:i]) for i in range(len(ranks) + 1)]
    ups = [up[:, offs[i] : offs[i + 1]].to(dtype) for i in range(len(ranks))]
    downs = [down[offs[i] : offs[i + 1]].to(dtype) for i in range(len(ranks))]
    return ups, downs


@pytest.mark.parametrize("split", ["up", "sqrt"])
def test_refactor_sum_fp32_gram_is_best_rank_k(split):
    ups, downs = factors(1, 96, 160, [12, 10])
    coeffs = [0.7, -1.6]
    g_up = torch.cat([u.float() for u in ups], 1)
    g_down = torch.cat([c * d.float() for c, d in zip(coeffs, downs)], 0)
    assert linalg._gram32_plan(g_up.T @ g_up, g_down @ g_down.T, 9, FP16_TOL) is not None  # the fast route runs
    up, down = linalg.refactor_sum(ups, downs, coeffs, 9, split, tol=FP16_TOL)
    assert up.shape == (96, 9) and down.shape == (9, 160)
    m, best = best_rank_k(ups, downs, coeffs, 9)
    got = up.double() @ down.double()
    assert rel(got, best) < 1e-5
    # Eckart–Young: the error is the optimal one
    assert float((m - got).norm()) == pytest.approx(float((m - best).norm()), rel=1e-6)
    # the same product as the concatenated route
    cu, cd = linalg.refactor(*linalg.concat_factors(ups, downs, coeffs), 9, split)
    assert rel(got, cu.double() @ cd.double()) < 1e-5


@pytest.mark.parametrize("cond", [3, 10, 30, 100])
def test_fp32_gram_error_stays_under_its_bound(cond):
    """The acceptance rule's error model: relative error ≤ _GRAM32_C · u32 · κ (κ of the whitened side)."""
    ups, downs = factors(5, 200, 240, [12, 12], dtype=torch.float32, up_cond=cond, down_cond=cond)
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    g = down.double() @ down.double().T  # with tol=1 the first side tried, A, is whitened
    d = g.diagonal().rsqrt()
    eig = torch.linalg.eigvalsh(g * d[:, None] * d[None, :])
    kappa = float(eig[-1] / eig[0])
    u, s, vh = linalg._core_svd_gram32(up, down, 16, 1.0)
    _, best = best_rank_k([up], [down], [1.0], 16)
    assert rel((u.double() * s.double()) @ vh.double(), best) <= linalg._GRAM32_C * linalg._U32 * kappa


def test_fp32_gram_whitens_the_better_conditioned_side():
    """B badly conditioned (trained LoRAs), A random: the route still runs, by whitening A."""
    ups, downs = factors(2, 80, 120, [8, 8], up_cond=1e4)
    up, down = torch.cat([u.float() for u in ups], 1), torch.cat([d.float() for d in downs], 0)
    g_up, g_down = up.T @ up, down @ down.T
    assert linalg._gram32_plan(g_up, g_down, 6, FP16_TOL) is not None
    assert linalg._gram32_plan(g_down, g_up, 6, FP16_TOL) is not None  # symmetric: transposed problem
    u, s, vh = linalg._core_svd_gram32(up, down, 6, FP16_TOL)
    _, best = best_rank_k([up], [down], [1.0], 6)
    assert rel((u * s) @ vh, best) < 1e-5


def test_ill_conditioned_factors_fall_back_to_fp64():
    ups, downs = factors(3, 80, 120, [8, 8], up_cond=1e4, down_cond=1e4)
    up, down = torch.cat([u.float() for u in ups], 1), torch.cat([d.float() for d in downs], 0)
    assert linalg._gram32_plan(up.T @ up, down @ down.T, 6, FP16_TOL) is None  # κ ≈ 1e8 on both sides
    got_up, got_down = linalg.refactor_sum(ups, downs, [1.0, 1.0], 6, tol=FP16_TOL)
    _, best = best_rank_k(ups, downs, [1.0, 1.0], 6)
    assert rel(got_up.double() @ got_down.double(), best) < 1e-5


def test_tol_zero_never_takes_the_fp32_route(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fp32 Gram route used for an fp32 result")

    monkeypatch.setattr(linalg, "_gram32_plan", boom)
    ups, downs = factors(4, 40, 50, [6, 6])
    linalg.refactor_sum(ups, downs, [1.0, 1.0], 5)
    linalg.refactor(torch.cat(ups, 1), torch.cat(downs, 0), 5)


def sdxl_like_pair(n_layers=12, r=16):
    """Two fp16 adapters with layers of several shapes (one conv); different alphas."""
    g = torch.Generator().manual_seed(7)
    names = [f"unet.up_blocks.{i}.attentions.0.transformer_blocks.0.attn2.to_k" for i in range(n_layers)]
    names.append("unet.up_blocks.0.resnets.0.conv1")
    ads = []
    for alpha in (8.0, 16.0):
        ad = Adapter(dialect="kohya")
        for i, n in enumerate(names):
            d_out, d_in = 48 + 8 * (i % 3), 64 + 16 * (i % 4)
            if n.endswith("conv1"):
                down, up = torch.randn(r, 8, 3, 3, generator=g), torch.randn(d_out, r, 1, 1, generator=g)
            else:
                down, up = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
            ad.modules[n] = LoraModule.from_tensors(n, down.half(), up.half(), alpha)
        ads.append(ad)
    return ads


def test_rank_k_fp16_output_is_best_rank_k_and_independent_of_threads():
    a, b = sdxl_like_pair()
    w = [0.9, 0.6]
    one = lm.merge([a, b], weights=w, rank=12, dtype="fp16", threads=1)
    many = lm.merge([a, b], weights=w, rank=12, dtype="fp16", threads=3)
    assert list(one.adapter.modules) == list(many.adapter.modules) == list(a.modules)  # plan order kept
    for name, m in one.adapter.modules.items():
        m2 = many.adapter.modules[name]
        assert torch.equal(m.up.load(), m2.up.load()) and torch.equal(m.down.load(), m2.down.load())
        assert m.up.dtype == torch.float16 and m.rank == 12
        assert one.report["layers"][name]["refactored"]
        ups = [x.modules[name].up.load().reshape(m.up.shape[0], -1) for x in (a, b)]
        downs = [x.modules[name].down.load().reshape(16, -1) for x in (a, b)]
        _, best = best_rank_k(ups, downs, [w[0] * 8 / 16, w[1] * 16 / 16], 12)
        # fp16 factors: the output's own rounding (2^-11 per element) dominates
        assert rel(m.delta(torch.float64).reshape(best.shape), best) < 2e-3


def test_threads_must_be_positive():
    a, b = sdxl_like_pair(2)
    with pytest.raises(UsageError, match="threads"):
        lm.merge([a, b], rank=4, threads=0)


def test_worker_errors_reach_the_caller_and_write_nothing(tmp_path, monkeypatch):
    a, b = sdxl_like_pair(6)
    calls = {"n": 0}
    real = linalg.refactor_sum

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("worker failed")
        return real(*args, **kw)

    monkeypatch.setattr(linalg, "refactor_sum", flaky)
    out = tmp_path / "out.safetensors"
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the engine runs layers on one torch thread each and must restore this
    try:
        with pytest.raises(RuntimeError, match="worker failed"):
            lm.merge([a, b], out, rank=4, dtype="fp16", threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_threads_option(tmp_path, capsys):
    import json

    from lora_merge.cli import main

    a, b = sdxl_like_pair(4)
    pa, pb = lm.save(a, tmp_path / "a.safetensors"), lm.save(b, tmp_path / "b.safetensors")
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"m{threads}.safetensors"
        with pytest.raises(SystemExit) as exc:
            main(["merge", str(pa), str(pb), "-o", str(out), "--rank", "8", "--dtype", "fp16", "--threads", threads, "--json"])
        assert exc.value.code == 0
        assert json.loads(capsys.readouterr().out)["output"] == str(out)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]  # the same bytes whatever the thread count
    with pytest.raises(SystemExit) as exc:
        main(["merge", str(pa), str(pb), "-o", str(tmp_path / "x.safetensors"), "--threads", "0"])
    assert exc.value.code == 2 and "--threads" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
