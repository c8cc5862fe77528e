"""Mask math (lora_merge.masks) and input models (lora_merge.input_models) on small random layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_merge import masks as M
from lora_merge.errors import FormatError, OutputExistsError, UsageError
from lora_merge.input_models import (
    IdentityModel,
    SubspaceModel,
    load_stats,
    resolve_input_model,
    row_space_basis,
    save_stats,
)


def _layer(d_out=12, d_in=16, rc=3, rs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return r(d_out, rc), r(rc, d_in), r(d_out, rs), r(rs, d_in)


def _sigma(model, a_c, a_s):
    lc, ls = model.factors("", a_c, a_s)
    d = a_c.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    return (eye if lc is None else lc @ lc.T), (eye if ls is None else ls @ ls.T)


def _dense_objective(axis, bc, ac, bs, as_, sc, ss, lam_cyc):
    """The quadratic part formed densely, as a torch function of the stacked mask (for autograd)."""
    bc, ac, bs, as_ = (t.double() for t in (bc, ac, bs, as_))
    dc, ds = bc @ ac, bs @ as_
    rc = ac.shape[0]

    def merged(z):
        if axis == "rank":
            return bc @ (z[:rc, None] * ac) + bs @ (z[rc:, None] * as_)
        if axis == "out":
            return z[:, :1] * dc + z[:, 1:] * ds
        return dc * z[:, 0][None] + ds * z[:, 1][None]

    def e(x, s):
        return torch.trace(x @ s @ x.T)

    ec, es = e(dc, sc), e(ds, ss)

    def f(z):
        m = merged(z)
        cyc = e(m - dc - ds, sc) / ec + e(m - dc - ds, ss) / es
        return e(m - dc, sc) / ec + e(m - ds, ss) / es + lam_cyc * cyc

    return f


# ---------------------------------------------------------------- folding


@pytest.mark.parametrize("axis", ["out", "in", "rank"])
def test_folding_is_exact_against_dense_masked_sum(axis):
    bc, ac, bs, as_ = _layer()
    n = {"out": 12, "in": 16}.get(axis)
    mc = torch.rand(n if n else 3)
    ms = torch.rand(n if n else 4)
    up, down = M.fold_pair(axis, bc, ac, bs, as_, mc, ms)
    assert up.shape[1] == down.shape[0] == 7  # a standard rank r_c + r_s LoRA
    if axis == "rank":
        want = bc @ torch.diag(mc) @ ac + bs @ torch.diag(ms) @ as_
    else:
        want = M.dense_masked_sum(axis, bc @ ac, bs @ as_, mc, ms)
    torch.testing.assert_close(up @ down, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", ["out", "in", "rank"])
def test_all_ones_masks_reproduce_the_direct_merge(axis):
    bc, ac, bs, as_ = _layer()
    n = {"out": 12, "in": 16}.get(axis)
    up, down = M.fold_pair(axis, bc, ac, bs, as_, torch.ones(n or 3), torch.ones(n or 4))
    torch.testing.assert_close(up @ down, bc @ ac + bs @ as_, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- closed form


@pytest.mark.parametrize("axis", ["out", "in", "rank"])
@pytest.mark.parametrize("model", [SubspaceModel(), IdentityModel()], ids=["subspace", "identity"])
def test_closed_form_equals_the_optimum_gradient_descent_finds(axis, model):
    bc, ac, bs, as_ = _layer(seed=1)
    lam = 0.05
    p = M.build_problem(axis, bc, ac, bs, as_, model, lambda_cycle=lam)
    z_cf = p.closed_form(p.target("ones"))
    sc, ss = _sigma(model, ac, as_)
    f = _dense_objective(axis, bc, ac, bs, as_, sc, ss, lam)
    z = torch.tensor(p.target("ones"), requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=2000, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = f(z)
        loss.backward()
        return loss

    opt.step(closure)
    f_gd, f_cf = float(f(z.detach())), float(f(torch.from_numpy(z_cf)))
    assert f_cf <= f_gd + 1e-7 * max(1.0, abs(f_gd))
    # the objective the solver reports is the same function
    assert p.terms(z_cf).total == pytest.approx(f_cf, rel=1e-5, abs=1e-7)
    # the minimizer is unique here, so the masks agree too
    np.testing.assert_allclose(z_cf, z.detach().numpy(), atol=2e-3)


def test_closed_form_keeps_the_anchor_where_the_objective_is_flat():
    # the style LoRA's up factor is zero in its last rank: that mask entry does not affect anything
    bc, ac, bs, as_ = _layer(rc=2, rs=3)
    bs[:, 2] = 0
    p = M.build_problem("rank", bc, ac, bs, as_, IdentityModel())
    anchor = np.array([0.3, 0.4, 0.5, 0.6, 0.7])
    z = p.closed_form(anchor)
    assert z[4] == pytest.approx(0.7, abs=1e-6)


def test_orthogonal_inputs_make_all_ones_optimal():
    g = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(16, 8, generator=g))[0].T  # 8 orthonormal rows
    ac, as_ = torch.randn(4, 4, generator=g) @ q[:4], torch.randn(4, 4, generator=g) @ q[4:]
    bc, bs = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    for axis in ("rank", "out"):
        p = M.build_problem(axis, bc, ac, bs, as_, SubspaceModel())
        t = p.terms(p.closed_form(p.target("ones")))
        assert t.recon_content < 1e-6 and t.recon_style < 1e-6


def test_refine_never_increases_the_objective():
    bc, ac, bs, as_ = _layer(seed=4)
    p = M.build_problem("rank", bc, ac, bs, as_, SubspaceModel(), lambda_sim=0.5, lambda_prior=0.5,
                        lambda_hinge=1.0, role="content", lambda_cycle=0.01)  # fmt: skip
    z0 = p.closed_form(p.target("ones"))
    z, _ = M.refine(p, z0, steps=60, lr=0.01)
    assert p.terms(z).total <= p.terms(z0).total + 1e-12
    sol = M.solve(p, None, closed_form=True, steps=60, lr=0.01)
    assert sol.final.total <= sol.closed_form.total + 1e-9


def test_refine_lowers_similarity_when_it_is_heavily_weighted():
    bc, ac, bs, as_ = _layer(seed=5)
    p = M.build_problem("out", bc, ac, bs, as_, SubspaceModel(), lambda_sim=5.0)
    sol = M.solve(p, None, closed_form=True, steps=200, lr=0.02)
    assert sol.final.similarity < sol.closed_form.similarity
    assert sol.final.total < sol.closed_form.total


# ---------------------------------------------------------------- non-smooth terms and init


def test_similarity_and_prior_terms():
    assert M.similarity([1, -2, 0], [3, 1, 5]) == pytest.approx((3 + 2 + 0) / 3)
    assert M.similarity([1, 1], [2, 2, 7]) == pytest.approx(2.0)  # first min(len) pairs
    mc, ms = np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 1.0, 1.0, 1.0])
    # content layer: ‖m_c‖₁ + λ_h·max(0, ‖m_s‖₁ − ‖m_c‖₁) over r̄ = 4
    assert M.prior_rank_term(mc, ms, "content", 2.0) == pytest.approx((2 + 2 * 2) / 4)
    assert M.prior_rank_term(mc, ms, "style", 2.0) == pytest.approx((4 + 0) / 4)  # hinge inactive
    assert M.prior_rank_term(mc, ms, "neutral", 2.0) == 0.0
    # the relaxation is the nuclear norm of diag(m), i.e. ‖m‖₁ — not ‖m‖₂ as the public code computes
    m = torch.tensor([0.5, -0.25, 1.0])
    assert float(torch.linalg.matrix_norm(torch.diag(m), ord="nuc")) == pytest.approx(1.75)
    assert M.prior_rank_term(m.numpy(), np.zeros(3), "content", 0.0) == pytest.approx(1.75 / 3)


def test_prior_subgradients_match_finite_differences():
    rng = np.random.default_rng(0)
    mc, ms = rng.normal(size=5), rng.normal(size=5) * 2
    for role in ("content", "style"):
        gc, gs = M._prior_grad(mc, ms, role, 1.5)
        eps = 1e-6
        for i in range(5):
            d = np.zeros(5)
            d[i] = eps
            num = (M.prior_rank_term(mc + d, ms, role, 1.5) - M.prior_rank_term(mc - d, ms, role, 1.5)) / (2 * eps)
            assert gc[i] == pytest.approx(num, abs=1e-5)
            num = (M.prior_rank_term(mc, ms + d, role, 1.5) - M.prior_rank_term(mc, ms - d, role, 1.5)) / (2 * eps)
            assert gs[i] == pytest.approx(num, abs=1e-5)


def test_prior_init_follows_the_public_rule_and_is_seeded():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    mc, ms = M.prior_init(64, 64, "content", g1)
    mc2, ms2 = M.prior_init(64, 64, "content", g2)
    assert torch.equal(mc, mc2) and torch.equal(ms, ms2)
    assert int((mc > 0).sum()) > int((ms > 0).sum())  # content starts with more ones in a content layer
    nz = ms[ms > 0]
    assert bool((nz > 0.75).all()) and bool((mc[mc > 0] > 0.5).all())
    sc, ss = M.prior_init(64, 64, "style", torch.Generator().manual_seed(7))
    assert torch.equal(sc, ms) and torch.equal(ss, mc)  # mirrored
    nc, ns = M.prior_init(8, 6, "neutral", torch.Generator().manual_seed(7))
    assert nc.shape == (8,) and ns.shape == (6,) and torch.equal(nc[:6], ns)


# ---------------------------------------------------------------- input models


def test_subspace_grams_equal_the_dense_projector_form():
    _, ac, _, as_ = _layer(d_in=20)
    q = torch.cat([ac, as_])
    gc, gs = SubspaceModel().grams("", ac, as_)
    pc = torch.linalg.pinv(ac.double()) @ ac.double()  # projector onto the row space of A_c
    ps = torch.linalg.pinv(as_.double()) @ as_.double()
    torch.testing.assert_close(gc, q.double() @ pc @ q.double().T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gs, q.double() @ ps @ q.double().T, rtol=1e-4, atol=1e-4)
    basis = row_space_basis(ac)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_subspace_model_ignores_how_a_lora_is_factored():
    bc, ac, bs, as_ = _layer()
    g = torch.randn(3, 3) + 3 * torch.eye(3)
    p1 = M.build_problem("out", bc, ac, bs, as_, SubspaceModel())
    p2 = M.build_problem("out", bc @ g, torch.linalg.solve(g, ac), bs, as_, SubspaceModel())
    np.testing.assert_allclose(p1.closed_form(p1.target("ones")), p2.closed_form(p2.target("ones")), atol=1e-4)


def test_stats_file_roundtrip_full_and_low_rank(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g)
    full = x.T @ x / 50
    u, s, _ = torch.linalg.svd(full)
    path = save_stats(tmp_path / "s.safetensors",
                      {"unet.a": {"content": full, "style": full * 2},
                       "unet.b": {"content": (u[:, :4], s[:4]), "style": (u[:, :4], s[:4])}},
                      counts={"content": 50, "style": 50}, metadata={"prompts": "a cat"})  # fmt: skip
    model = load_stats(path)
    assert model.metadata["prompts"] == "a cat" and '"content": 50' in model.metadata["counts"]
    lc, ls = model.factors("unet.a", torch.zeros(2, 16), torch.zeros(2, 16))
    torch.testing.assert_close(lc @ lc.T, full.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ls @ ls.T, 2 * full.double(), rtol=1e-4, atol=1e-5)
    lc, _ = model.factors("unet.b", torch.zeros(2, 16), torch.zeros(2, 16))
    torch.testing.assert_close(lc @ lc.T, (u[:, :4] * s[:4]) @ u[:, :4].T, rtol=1e-4, atol=1e-5, check_dtype=False)
    # a stats model drives the objective like any other
    bc, ac, bs, as_ = _layer(d_in=16)
    p = M.build_problem("rank", bc, ac, bs, as_, model, "unet.a")
    assert p.energy_c > 0
    with pytest.raises(UsageError, match="no entry"):
        model.factors("unet.zzz", torch.zeros(2, 16), torch.zeros(2, 16))
    with pytest.raises(UsageError, match="16-wide"):
        model.factors("unet.a", torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(OutputExistsError):
        save_stats(path, {"unet.a": {"content": full, "style": full}})
    assert isinstance(resolve_input_model("stats", path), type(model))


def test_stats_file_errors(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"x.content": torch.eye(3), "x.style": torch.eye(3)}, str(bad))  # no format metadata
    with pytest.raises(FormatError, match="format"):
        load_stats(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(FormatError):
        load_stats(junk)
    with pytest.raises(UsageError, match="needs a statistics file"):
        resolve_input_model("stats", None)
    with pytest.raises(UsageError, match="unknown input model"):
        resolve_input_model("nope")


def test_batched_refinement_matches_one_layer_at_a_time():
    probs, zs = [], []
    for seed, (axis, role) in enumerate([("rank", "content"), ("rank", "style"), ("rank", "neutral"),
                                         ("out", "neutral"), ("out", "neutral")]):  # fmt: skip
        bc, ac, bs, as_ = _layer(d_out=10 + seed, rc=3, rs=3, seed=seed)
        p = M.build_problem(axis, bc, ac, bs, as_, SubspaceModel(), lambda_sim=0.3 + 0.1 * seed,
                            lambda_prior=0.2, lambda_hinge=1.5, role=role, lambda_cycle=0.01)  # fmt: skip
        probs.append(p)
        zs.append(p.closed_form(p.target("ones")))
    batched = M.refine_many(probs, zs, steps=40, lr=0.02)
    for p, z0, (zb, tb) in zip(probs, zs, batched):
        z1, t1 = M.refine(p, z0, steps=40, lr=0.02)
        np.testing.assert_allclose(zb, z1, rtol=1e-9, atol=1e-9)
        assert tb == t1
