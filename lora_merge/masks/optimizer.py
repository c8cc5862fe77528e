"""Adam refinement of the mask objective (:class:`~lora_merge.masks.problem.MaskProblem`) and the
closed-form → Adam pipeline (:func:`start`, :func:`finish`, :func:`solve`).

:func:`refine` runs one layer.  :func:`refine_many` gives the same iterates for many layers at once:
``_refine_dense`` stacks dense problems of equal ranks and ``_refine_blocks`` concatenates the 2×2-block
problems row-wise (in place, since those arrays have one row per output dimension of every layer).  The
three loops are kept for speed; they share the Adam constants below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .problem import MaskProblem, Terms, _prior_grad, _similarity_grad, prior_rank_term, similarity

#: Adam's moment decay rates and denominator guard, for every loop in this module
_B1, _B2, _EPS = 0.9, 0.999, 1e-8


def _adam_step(z: np.ndarray, g: np.ndarray, m1: np.ndarray, m2: np.ndarray, t: int, lr: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """One bias-corrected Adam step (step number ``t`` ≥ 1): the new ``(z, m1, m2)``."""
    m1 = _B1 * m1 + (1 - _B1) * g
    m2 = _B2 * m2 + (1 - _B2) * g * g
    z = z - lr * (m1 / (1 - _B1**t)) / (np.sqrt(m2 / (1 - _B2**t)) + _EPS)
    return z, m1, m2


def refine(problem: MaskProblem, z0: np.ndarray, steps: int, lr: float) -> tuple[np.ndarray, int]:
    """Adam on the full objective (sub-gradients for ``|·|`` and the hinge) from ``z0``; returns the best
    iterate seen (so the objective never gets worse than at ``z0``) and the step that found it."""
    z = np.array(z0, dtype=np.float64, copy=True)
    if steps <= 0 or z.size == 0:
        return z, 0
    b = problem.rhs()
    lam_sim, lam_pr = problem.lambda_sim, problem.lambda_prior * problem.prior_score
    use_prior = problem.axis == "rank" and lam_pr != 0 and problem.role != "neutral"
    m1 = np.zeros_like(z)
    m2 = np.zeros_like(z)
    best, best_f, best_t = z.copy(), math.inf, 0
    for t in range(1, steps + 2):
        hz = problem.htot_v(z)
        g = 2.0 * (hz - b)
        f = float((z * hz).sum() - 2.0 * (b * z).sum())
        mc, ms = problem.split(z)
        if lam_sim:
            f += lam_sim * similarity(mc, ms)
            gc, gs = _similarity_grad(mc, ms)
            g = g + lam_sim * problem.join(gc, gs)
        if use_prior:
            f += lam_pr * prior_rank_term(mc, ms, problem.role, problem.lambda_hinge)
            gc, gs = _prior_grad(mc, ms, problem.role, problem.lambda_hinge)
            g = g + lam_pr * problem.join(gc, gs)
        if f < best_f:
            best, best_f, best_t = z.copy(), f, t - 1
        if t > steps:
            break
        z, m1, m2 = _adam_step(z, g, m1, m2, t, lr)
    return best, best_t


def refine_many(problems: list[MaskProblem], z0s: list[np.ndarray], steps: int, lr: float
                ) -> list[tuple[np.ndarray, int]]:  # fmt: skip
    """:func:`refine` for many layers at once, vectorized: dense problems of equal ranks are stacked,
    block problems are concatenated row-wise; the same iterates as one :func:`refine` per layer (up to
    round-off), at a fraction of the per-call overhead.  Matrix-free problems run one by one."""
    out: list[tuple[np.ndarray, int] | None] = [None] * len(problems)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        if steps <= 0 or z0s[i].size == 0 or p.kind == "matfree":
            out[i] = refine(p, z0s[i], steps, lr)
        else:
            key = ("dense", p.rc, p.rs) if p.kind == "dense" else ("blocks",)
            groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        ps, zs = [problems[i] for i in idx], [z0s[i] for i in idx]
        res = _refine_dense(ps, zs, steps, lr) if key[0] == "dense" else _refine_blocks(ps, zs, steps, lr)
        for i, r in zip(idx, res):
            out[i] = r
    return out  # type: ignore[return-value]


def _refine_dense(ps: list[MaskProblem], zs: list[np.ndarray], steps: int, lr: float):
    rc, rs = ps[0].rc, ps[0].rs
    k = min(rc, rs)
    h = np.stack([p.htot() for p in ps])
    b = np.stack([p.rhs() for p in ps])
    z = np.stack(zs).astype(np.float64)
    lam_sim = np.array([p.lambda_sim for p in ps])[:, None]
    use_pr = np.array([p.lambda_prior * p.prior_score if p.role != "neutral" else 0.0 for p in ps])
    role_c = np.array([p.role == "content" for p in ps])
    lh = np.array([p.lambda_hinge for p in ps])
    rbar = 0.5 * (rc + rs)
    any_prior = bool(np.any(use_pr != 0))
    m1, m2 = np.zeros_like(z), np.zeros_like(z)
    best, best_f, best_t = z.copy(), np.full(len(ps), np.inf), np.zeros(len(ps), dtype=int)
    for t in range(1, steps + 2):
        hz = np.einsum("lij,lj->li", h, z)  # the stacked mat-vec dominates; einsum beats matmul/bmm here
        g = 2.0 * (hz - b)
        f = (z * hz).sum(1) - 2.0 * (b * z).sum(1)
        mc, ms = z[:, :rc], z[:, rc:]
        if k:
            prod = mc[:, :k] * ms[:, :k]
            f += lam_sim[:, 0] * np.abs(prod).mean(1)
            sg = np.sign(prod) * (lam_sim / k)
            g[:, :k] += sg * ms[:, :k]
            g[:, rc:rc + k] += sg * mc[:, :k]
        if any_prior:
            nc, ns = np.abs(mc).sum(1), np.abs(ms).sum(1)
            dom, oth = np.where(role_c, nc, ns), np.where(role_c, ns, nc)
            act = (oth > dom).astype(np.float64)
            f += use_pr * (dom + lh * np.maximum(0.0, oth - dom)) / rbar
            cd, co = (1.0 - lh * act) / rbar, (lh * act) / rbar
            g[:, :rc] += (use_pr * np.where(role_c, cd, co))[:, None] * np.sign(mc)
            g[:, rc:] += (use_pr * np.where(role_c, co, cd))[:, None] * np.sign(ms)
        better = f < best_f
        best[better], best_f[better], best_t[better] = z[better], f[better], t - 1
        if t > steps:
            break
        z, m1, m2 = _adam_step(z, g, m1, m2, t, lr)
    return [(best[i].copy(), int(best_t[i])) for i in range(len(ps))]


def _refine_blocks(ps: list[MaskProblem], zs: list[np.ndarray], steps: int, lr: float):
    """Adam on concatenated 2×2-block problems; columns kept as separate arrays and updated in place
    (the arrays are large: one row per output dimension of every layer)."""
    sizes = [p.n for p in ps]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    seg = np.repeat(np.arange(len(ps)), sizes)
    h = np.concatenate([p.htot() for p in ps])
    h00, h01, h11 = h[:, 0, 0].copy(), 0.5 * (h[:, 0, 1] + h[:, 1, 0]), h[:, 1, 1].copy()
    del h
    b = np.concatenate([p.rhs() for p in ps])
    b0, b1_ = b[:, 0].copy(), b[:, 1].copy()
    z = np.concatenate(zs).astype(np.float64)
    u, v = z[:, 0].copy(), z[:, 1].copy()
    wsim = np.repeat([p.lambda_sim / max(p.n, 1) for p in ps], sizes)
    nonempty = np.array(sizes) > 0
    red_at = np.minimum(starts, max(len(u) - 1, 0))
    mu, mv, su, sv = (np.zeros_like(u) for _ in range(4))
    gu, gv, t1, t2 = (np.empty_like(u) for _ in range(4))
    best_u, best_v = u.copy(), v.copy()
    best_f, best_t = np.full(len(ps), np.inf), np.zeros(len(ps), dtype=int)
    for t in range(1, steps + 2):
        np.multiply(h00, u, out=gu)
        gu += h01 * v  # gu = (H z)_u
        np.multiply(h11, v, out=gv)
        gv += h01 * u  # gv = (H z)_v
        np.multiply(u, v, out=t1)  # t1 = u·v
        np.sign(t1, out=t2)
        np.abs(t1, out=t1)
        # f_row = z·Hz − 2 b·z + wsim·|uv|
        f_row = u * gu + v * gv - 2.0 * (b0 * u + b1_ * v) + wsim * t1
        t2 *= wsim
        gu -= b0
        gu *= 2.0
        gu += t2 * v
        gv -= b1_
        gv *= 2.0
        gv += t2 * u
        f = np.where(nonempty, np.add.reduceat(f_row, red_at), 0.0) if len(u) else np.zeros(len(ps))
        better = f < best_f
        if better.any():
            rows = better[seg]
            best_u[rows], best_v[rows] = u[rows], v[rows]
            best_f[better], best_t[better] = f[better], t - 1
        if t > steps:
            break
        c1, c2 = lr / (1 - _B1**t), 1.0 / (1 - _B2**t)
        for m, sq, g, x in ((mu, su, gu, u), (mv, sv, gv, v)):
            m *= _B1
            m += (1 - _B1) * g
            sq *= _B2
            g *= g
            g *= 1 - _B2
            sq += g
            np.multiply(sq, c2, out=t1)
            np.sqrt(t1, out=t1)
            t1 += _EPS
            np.divide(m, t1, out=t1)
            t1 *= c1
            x -= t1
    return [(np.stack([best_u[s:s + n], best_v[s:s + n]], 1), int(best_t[i]))
            for i, (s, n) in enumerate(zip(starts, sizes))]


@dataclass
class Solution:
    mask_c: torch.Tensor
    mask_s: torch.Tensor
    init: Terms
    closed_form: Terms | None
    final: Terms
    best_step: int


def start(problem: MaskProblem, init: tuple[torch.Tensor, torch.Tensor] | None, closed_form: bool
          ) -> tuple[np.ndarray, Terms, Terms | None]:  # fmt: skip
    """Initial masks (all ones when ``init`` is None) and, optionally, the closed form nearest to them."""
    if init is None:
        z0 = problem.target("ones")
    else:
        z0 = problem.join(init[0].double().numpy(), init[1].double().numpy())
    t_init = problem.terms(z0)
    if not closed_form:
        return z0, t_init, None
    z = problem.closed_form(z0)
    return z, t_init, problem.terms(z)


def finish(problem: MaskProblem, z: np.ndarray, best_step: int, t_init: Terms, t_cf: Terms | None) -> Solution:
    mc, ms = problem.split(z)
    return Solution(
        torch.from_numpy(np.ascontiguousarray(mc)).float(), torch.from_numpy(np.ascontiguousarray(ms)).float(),
        t_init, t_cf, problem.terms(z), best_step,
    )  # fmt: skip


def solve(
    problem: MaskProblem,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    closed_form: bool = True,
    steps: int = 100,
    lr: float = 0.01,
) -> Solution:
    """Closed form of the quadratic part (nearest to ``init``; all ones when None), then Adam."""
    z, t_init, t_cf = start(problem, init, closed_form)
    z, best_t = refine(problem, z, steps, lr)
    return finish(problem, z, best_t, t_init, t_cf)
