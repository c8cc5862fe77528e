"""Merge masks for two LoRAs (content ``c``, style ``s``) solved per layer from the factors alone.

Mask families (algorithms.md §2, §5, §6), all folded exactly into the factors:

* ``out``  — ZipLoRA (paper): ``ΔW_m = diag(u) ΔW_c + diag(v) ΔW_s``, ``u, v ∈ R^{d_out}``;
* ``in``   — ZipLoRA (public code): ``ΔW_m = ΔW_c diag(u) + ΔW_s diag(v)``, ``u, v ∈ R^{d_in}``;
* ``rank`` — DuoLoRA's ZipRank: ``ΔW_m = B_c diag(m_c) Â_c + B_s diag(m_s) Â_s``.

Here ``Â = weight · scale · A``: the user's strength and the LoRA's ``alpha/r`` are folded into the down
factor once, so the targets are the LoRAs at the strengths the user asked for.

Objective (algorithms.md §8), with inputs of second moment ``Σ_c`` / ``Σ_s`` (:mod:`lora_merge.input_models`)::

    F = ‖(ΔW_m − ΔW_c) X_c‖²/‖ΔW_c X_c‖² + ‖(ΔW_m − ΔW_s) X_s‖²/‖ΔW_s X_s‖²          reconstruction
        + λ_cyc · (‖(ΔW_m − ΔW_c − ΔW_s) X_c‖²/‖ΔW_c X_c‖² + (same on X_s))          weight-space Constyle
        + λ_sim · mean_i |m_c(i) m_s(i)|                                             similarity
        + λ_prior · score · L_prior(m_c, m_s)                                        DuoLoRA rank prior

Every quadratic term is ``(z − t)ᵀ H (z − t)`` in the stacked mask vector ``z`` with ``H = (PᵀP) ⊙ (Q Σ Qᵀ)``
(``P = [B_c B_s]``, ``Q = [Â_c; Â_s]``): an ``R × R`` matrix for rank masks, independent ``2 × 2`` blocks
per output row for ``out`` masks (and per input column for ``in`` masks when ``Σ = I``), and a
matrix-free operator for ``in`` masks otherwise.  The quadratic part is minimized in closed form
(the minimizer nearest to the initialization where it is not unique), then the full objective is
refined with Adam; the best iterate is kept.  The solver works in float64 on small arrays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from .input_models import InputModel

Axis = Literal["out", "in", "rank"]
Role = Literal["content", "style", "neutral"]
AXES = ("out", "in", "rank")

# ---------------------------------------------------------------- folding (algorithms.md §2)


def fold(axis: str, up: torch.Tensor, down: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one mask into ``(B, A)`` exactly: ``out`` → ``diag(m) B A``, ``in`` → ``B A diag(m)``,
    ``rank`` → ``B diag(m) A``."""
    mask = mask.to(device=down.device, dtype=down.dtype)
    if axis == "out":
        return mask[:, None] * up, down
    if axis == "in":
        return up, down * mask[None, :]
    if axis == "rank":
        return up, mask[:, None] * down
    raise ValueError(f"unknown mask axis {axis!r}")


def fold_pair(
    axis: str,
    up_c: torch.Tensor,
    down_c: torch.Tensor,
    up_s: torch.Tensor,
    down_s: torch.Tensor,
    mask_c: torch.Tensor,
    mask_s: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` of rank ``r_c + r_s`` with ``up @ down = masked ΔW_c + masked ΔW_s`` (factors as given,
    i.e. any scale must already be in them)."""
    bc, ac = fold(axis, up_c, down_c, mask_c)
    bs, as_ = fold(axis, up_s, down_s, mask_s)
    return torch.cat([bc, bs], dim=1), torch.cat([ac, as_], dim=0)


def dense_masked_sum(axis: str, delta_c: torch.Tensor, delta_s: torch.Tensor, mask_c, mask_s) -> torch.Tensor:
    """Reference: the masked sum formed densely (``out``/``in`` only; tests)."""
    if axis == "out":
        return mask_c[:, None] * delta_c + mask_s[:, None] * delta_s
    if axis == "in":
        return delta_c * mask_c[None, :] + delta_s * mask_s[None, :]
    raise ValueError("dense_masked_sum needs the factors for rank masks")


# ---------------------------------------------------------------- non-smooth terms


def similarity(mask_c, mask_s) -> float:
    """``mean_i |m_c(i) · m_s(i)|`` over the paired entries (the first ``min(len)`` for unequal ranks)."""
    mc, ms = np.asarray(mask_c, dtype=np.float64), np.asarray(mask_s, dtype=np.float64)
    k = min(mc.shape[0], ms.shape[0])
    return float(np.abs(mc[:k] * ms[:k]).mean()) if k else 0.0


def _similarity_grad(mc: np.ndarray, ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = min(mc.shape[0], ms.shape[0])
    gc, gs = np.zeros_like(mc), np.zeros_like(ms)
    if k:
        sg = np.sign(mc[:k] * ms[:k]) / k
        gc[:k] = sg * ms[:k]
        gs[:k] = sg * mc[:k]
    return gc, gs


def prior_rank_term(mask_c, mask_s, role: str, lambda_hinge: float = 1.0) -> float:
    """DuoLoRA's rank constraint as the paper relaxes it (``‖diag m‖_* = ‖m‖₁``), per mask entry.

    Content layers: ``(‖m_c‖₁ + λ_h · max(0, ‖m_s‖₁ − ‖m_c‖₁)) / r̄``; style layers mirrored; neutral: 0.
    ``r̄ = (r_c + r_s)/2`` keeps the term's size independent of the rank.
    """
    mc, ms = np.asarray(mask_c, dtype=np.float64), np.asarray(mask_s, dtype=np.float64)
    if role == "neutral" or (mc.size + ms.size) == 0:
        return 0.0
    dom, oth = (mc, ms) if role == "content" else (ms, mc)
    nd, no = np.abs(dom).sum(), np.abs(oth).sum()
    rbar = 0.5 * (mc.size + ms.size)
    return float((nd + lambda_hinge * max(0.0, no - nd)) / rbar)


def _prior_grad(mc: np.ndarray, ms: np.ndarray, role: str, lambda_hinge: float) -> tuple[np.ndarray, np.ndarray]:
    if role == "neutral" or (mc.size + ms.size) == 0:
        return np.zeros_like(mc), np.zeros_like(ms)
    dom, oth = (mc, ms) if role == "content" else (ms, mc)
    rbar = 0.5 * (mc.size + ms.size)
    active = float(np.abs(oth).sum() > np.abs(dom).sum())
    gd = np.sign(dom) * (1.0 - lambda_hinge * active) / rbar
    go = np.sign(oth) * (lambda_hinge * active) / rbar
    return (gd, go) if role == "content" else (go, gd)


def prior_init(rc: int, rs: int, role: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DuoLoRA's prior initialization (public code's rule): ``v ~ U(0,1)`` drawn from ``generator``;
    content layers ``m_c = v·[v > 0.5]``, ``m_s = v·[v > 0.75]``; style layers swapped; neutral
    ``m_c = m_s = v``.  One draw of length ``max(r_c, r_s)`` serves both masks."""
    v = torch.rand(max(rc, rs), generator=generator, dtype=torch.float64, device=generator.device).cpu()
    lo, hi = v * (v > 0.5), v * (v > 0.75)
    if role == "content":
        mc, ms = lo, hi
    elif role == "style":
        mc, ms = hi, lo
    else:
        mc, ms = v, v
    return mc[:rc].clone(), ms[:rs].clone()


# ---------------------------------------------------------------- the quadratic problem


@dataclass
class Terms:
    recon_content: float
    recon_style: float
    cycle: float
    similarity: float
    prior: float
    total: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


@dataclass
class MaskProblem:
    """One layer's objective.  Build with :func:`build_problem`.  ``z`` is the stacked mask: shape
    ``(r_c + r_s,)`` for rank masks, ``(n, 2)`` (columns ``u``, ``v``) for ``out``/``in`` masks."""

    axis: str
    rc: int
    rs: int
    n: int  # mask length per input for out/in; r_c + r_s for rank
    energy_c: float
    energy_s: float
    kind: str  # "dense" | "blocks" | "matfree"
    hc: np.ndarray | None = None
    hs: np.ndarray | None = None
    # matrix-free (in-axis with a non-identity Σ): numpy float64 copies
    ptp: np.ndarray | None = None
    ac: np.ndarray | None = None
    as_: np.ndarray | None = None
    lc: np.ndarray | None = None
    ls: np.ndarray | None = None
    lambda_cycle: float = 0.0
    lambda_sim: float = 0.0
    lambda_prior: float = 0.0
    lambda_hinge: float = 1.0
    role: str = "neutral"
    prior_score: float = 1.0
    _cache: dict = field(default_factory=dict, repr=False)

    # ---- weights, targets
    @property
    def wc(self) -> float:
        return 1.0 / self.energy_c if self.energy_c > 0 else 0.0

    @property
    def ws(self) -> float:
        return 1.0 / self.energy_s if self.energy_s > 0 else 0.0

    @property
    def num_values(self) -> int:
        return self.rc + self.rs if self.axis == "rank" else 2 * self.n

    def target(self, which: str) -> np.ndarray:
        if self.axis == "rank":
            t = np.zeros(self.rc + self.rs)
            if which == "content":
                t[: self.rc] = 1.0
            elif which == "style":
                t[self.rc:] = 1.0
            else:
                t[:] = 1.0
            return t
        t = np.zeros((self.n, 2))
        if which in ("content", "ones"):
            t[:, 0] = 1.0
        if which in ("style", "ones"):
            t[:, 1] = 1.0
        return t

    def split(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.axis == "rank":
            return z[: self.rc], z[self.rc:]
        return z[:, 0], z[:, 1]

    def join(self, mc, ms) -> np.ndarray:
        mc, ms = np.asarray(mc, dtype=np.float64), np.asarray(ms, dtype=np.float64)
        return np.concatenate([mc, ms]) if self.axis == "rank" else np.stack([mc, ms], axis=1)

    # ---- operators
    def hv(self, which: str, d: np.ndarray) -> np.ndarray:
        """``H_which · d`` (``which`` = content | style)."""
        if self.kind == "dense":
            return (self.hc if which == "content" else self.hs) @ d
        if self.kind == "blocks":
            h = self.hc if which == "content" else self.hs
            return np.stack([h[:, 0, 0] * d[:, 0] + h[:, 0, 1] * d[:, 1], h[:, 1, 0] * d[:, 0] + h[:, 1, 1] * d[:, 1]], 1)
        lf = self.lc if which == "content" else self.ls
        yl = np.concatenate([self.ac @ (d[:, :1] * lf), self.as_ @ (d[:, 1:] * lf)], axis=0)
        m = self.ptp @ yl
        gu = ((self.ac.T @ m[: self.rc]) * lf).sum(1)
        gv = ((self.as_.T @ m[self.rc:]) * lf).sum(1)
        return np.stack([gu, gv], 1)

    def quad(self, which: str, d: np.ndarray) -> float:
        return float((d * self.hv(which, d)).sum())

    def htot_v(self, z: np.ndarray) -> np.ndarray:
        s = 1.0 + self.lambda_cycle
        return s * (self.wc * self.hv("content", z) + self.ws * self.hv("style", z))

    def rhs(self) -> np.ndarray:
        if "b" not in self._cache:
            tc, ts, one = self.target("content"), self.target("style"), self.target("ones")
            lam = self.lambda_cycle
            b = self.wc * (self.hv("content", tc) + lam * self.hv("content", one))
            b = b + self.ws * (self.hv("style", ts) + lam * self.hv("style", one))
            self._cache["b"] = b
        return self._cache["b"]

    # ---- objective
    def terms(self, z: np.ndarray) -> Terms:
        tc, ts, one = self.target("content"), self.target("style"), self.target("ones")
        rc_ = self.wc * self.quad("content", z - tc)
        rs_ = self.ws * self.quad("style", z - ts)
        cyc = self.wc * self.quad("content", z - one) + self.ws * self.quad("style", z - one)
        mc, ms = self.split(z)
        sim = similarity(mc, ms)
        pr = prior_rank_term(mc, ms, self.role, self.lambda_hinge) if self.axis == "rank" else 0.0
        total = rc_ + rs_ + self.lambda_cycle * cyc + self.lambda_sim * sim + self.lambda_prior * self.prior_score * pr
        return Terms(rc_, rs_, cyc, sim, pr, total)

    # ---- closed form of the quadratic part
    def htot(self) -> np.ndarray:
        """The quadratic part's Hessian/2 (``dense``: ``R×R``; ``blocks``: ``n×2×2``)."""
        return (1.0 + self.lambda_cycle) * (self.wc * self.hc + self.ws * self.hs)

    def closed_form(self, anchor: np.ndarray, rtol: float = 1e-10, cg_iters: int = 500) -> np.ndarray:
        """Minimizer of the quadratic part (reconstruction + cycle) nearest to ``anchor``.

        ``z = z₀ + (H + εI)⁻¹ (b − H z₀)`` with a tiny relative ridge ``ε = rtol·max diag H``: directions
        the objective does not see keep the anchor's value (the pseudo-inverse solution, up to ``ε``)."""
        b = self.rhs()
        if self.kind == "dense":
            h = self.htot()
            return anchor + _ridge_solve(h, b - h @ anchor, rtol)
        if self.kind == "blocks":
            h = self.htot()
            resid = b - np.stack([h[:, 0, 0] * anchor[:, 0] + h[:, 0, 1] * anchor[:, 1],
                                  h[:, 1, 0] * anchor[:, 0] + h[:, 1, 1] * anchor[:, 1]], 1)  # fmt: skip
            return anchor + _ridge_solve_2x2(h, resid, rtol)
        return _cg(self.htot_v, b, anchor, cg_iters)


def _ridge_solve(h: np.ndarray, r: np.ndarray, rtol: float) -> np.ndarray:
    n = h.shape[0]
    if n == 0:
        return r.copy()
    top = float(np.diag(h).max())
    if top <= 0:
        return np.zeros_like(r)
    hr = torch.from_numpy(0.5 * (h + h.T) + rtol * top * np.eye(n))
    rt = torch.from_numpy(np.ascontiguousarray(r))[:, None]
    c, info = torch.linalg.cholesky_ex(hr)
    if int(info) == 0:
        return torch.cholesky_solve(rt, c)[:, 0].numpy()
    # round-off made it indefinite: pseudo-inverse via eigh
    lam, v = torch.linalg.eigh(hr)
    inv = torch.where(lam > rtol * top, 1.0 / torch.where(lam > 0, lam, 1.0), 0.0)
    return (v @ (inv[:, None] * (v.T @ rt)))[:, 0].numpy()


def _ridge_solve_2x2(h: np.ndarray, r: np.ndarray, rtol: float) -> np.ndarray:
    """Per-row ``(H_i + εI)⁻¹ r_i`` for ``n`` symmetric PSD ``2×2`` blocks, vectorized."""
    if h.shape[0] == 0:
        return r.copy()
    top = float(max(h[:, 0, 0].max(), h[:, 1, 1].max()))
    if top <= 0:
        return np.zeros_like(r)
    eps = rtol * top
    a, c, d = h[:, 0, 0] + eps, 0.5 * (h[:, 0, 1] + h[:, 1, 0]), h[:, 1, 1] + eps
    det = a * d - c * c
    det = np.where(det > eps * eps, det, eps * eps)
    return np.stack([(d * r[:, 0] - c * r[:, 1]) / det, (a * r[:, 1] - c * r[:, 0]) / det], 1)


def _cg(op, b: np.ndarray, x0: np.ndarray, iters: int, tol: float = 1e-12) -> np.ndarray:
    """Conjugate gradients from ``x0`` (stays in ``x0 + range(H)``, so converges to the nearest minimizer)."""
    x = x0.copy()
    r = b - op(x)
    p = r.copy()
    rr = float((r * r).sum())
    b2 = max(float((b * b).sum()), 1e-300)
    for _ in range(iters):
        if rr <= tol * b2:
            break
        hp = op(p)
        php = float((p * hp).sum())
        if php <= 0:
            break
        a = rr / php
        x += a * p
        r -= a * hp
        rr_new = float((r * r).sum())
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def build_problem(
    axis: str,
    up_c: torch.Tensor,
    down_c: torch.Tensor,
    up_s: torch.Tensor,
    down_s: torch.Tensor,
    input_model: InputModel,
    module: str = "",
    **weights,
) -> MaskProblem:
    """The objective for one layer.  ``down_*`` must carry the strength (``Â = weight · scale · A``).
    ``weights``: ``lambda_cycle``, ``lambda_sim``, ``lambda_prior``, ``lambda_hinge``, ``role``,
    ``prior_score``."""
    if axis not in AXES:
        raise ValueError(f"unknown mask axis {axis!r}")
    rc, rs = int(down_c.shape[0]), int(down_s.shape[0])
    if rc == 0 or rs == 0:  # one LoRA is absent here: nothing to separate, only reconstruction is left
        weights = {**weights, "lambda_sim": 0.0, "lambda_prior": 0.0}
    ptp = _block_gram(up_c.float(), up_s.float())
    gc, gs = input_model.grams(module, down_c.float(), down_s.float())
    hc_r, hs_r = ptp * gc, ptp * gs
    ec = float(hc_r[:rc, :rc].sum()) if rc else 0.0
    es = float(hs_r[rc:, rc:].sum()) if rs else 0.0
    common = dict(axis=axis, rc=rc, rs=rs, energy_c=max(ec, 0.0), energy_s=max(es, 0.0), **weights)
    if axis == "rank":
        return MaskProblem(n=rc + rs, kind="dense", hc=hc_r.numpy(), hs=hs_r.numpy(), **common)
    bc, bs = up_c.double(), up_s.double()
    if axis == "out":
        blocks = [_row_blocks(bc, bs, g, rc) for g in (gc, gs)]
        return MaskProblem(n=int(up_c.shape[0]), kind="blocks", hc=blocks[0], hs=blocks[1], **common)
    # axis == "in"
    ac, as_ = down_c.double(), down_s.double()
    lc, ls = input_model.factors(module, down_c, down_s)
    if lc is None and ls is None:
        blocks = _col_blocks(ac, as_, ptp, rc)
        return MaskProblem(n=int(down_c.shape[1]), kind="blocks", hc=blocks, hs=blocks.copy(), **common)
    d_in = int(down_c.shape[1])
    eye = torch.eye(d_in, dtype=torch.float64)
    lc = eye if lc is None else lc.double()
    ls = eye if ls is None else ls.double()
    return MaskProblem(
        n=d_in, kind="matfree", ptp=ptp.numpy(), ac=ac.numpy(), as_=as_.numpy(), lc=lc.numpy(), ls=ls.numpy(),
        **common,
    )  # fmt: skip


def _block_gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[x y]ᵀ[x y]`` in fp64 without concatenating the (tall) factors."""
    xx, xy, yy = x.T @ x, x.T @ y, y.T @ y
    return torch.cat([torch.cat([xx, xy], 1), torch.cat([xy.T, yy], 1)], 0).double()


def _row_blocks(bc: torch.Tensor, bs: torch.Tensor, g: torch.Tensor, rc: int) -> np.ndarray:
    """Per output row ``i``: ``[[b_ci G_cc b_ciᵀ, b_ci G_cs b_siᵀ], [·, b_si G_ss b_siᵀ]]``."""
    qcc = ((bc @ g[:rc, :rc]) * bc).sum(1)
    qcs = ((bc @ g[:rc, rc:]) * bs).sum(1)
    qss = ((bs @ g[rc:, rc:]) * bs).sum(1)
    return torch.stack([torch.stack([qcc, qcs], 1), torch.stack([qcs, qss], 1)], 1).numpy()


def _col_blocks(ac: torch.Tensor, as_: torch.Tensor, ptp: torch.Tensor, rc: int) -> np.ndarray:
    """Per input column ``j`` with ``Σ = I``: ``[[a_cjᵀ (PᵀP)_cc a_cj, a_cjᵀ (PᵀP)_cs a_sj], [·, ·]]``."""
    qcc = ((ptp[:rc, :rc] @ ac) * ac).sum(0)
    qcs = ((ptp[:rc, rc:] @ as_) * ac).sum(0)
    qss = ((ptp[rc:, rc:] @ as_) * as_).sum(0)
    return torch.stack([torch.stack([qcc, qcs], 1), torch.stack([qcs, qss], 1)], 1).numpy()


# ---------------------------------------------------------------- refinement


def refine(problem: MaskProblem, z0: np.ndarray, steps: int, lr: float) -> tuple[np.ndarray, int]:
    """Adam on the full objective (sub-gradients for ``|·|`` and the hinge) from ``z0``; returns the best
    iterate seen (so the objective never gets worse than at ``z0``) and the step that found it."""
    z = np.array(z0, dtype=np.float64, copy=True)
    if steps <= 0 or z.size == 0:
        return z, 0
    b = problem.rhs()
    lam_sim, lam_pr = problem.lambda_sim, problem.lambda_prior * problem.prior_score
    use_prior = problem.axis == "rank" and lam_pr != 0 and problem.role != "neutral"
    b1, b2, eps = 0.9, 0.999, 1e-8
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
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        z = z - lr * (m1 / (1 - b1**t)) / (np.sqrt(m2 / (1 - b2**t)) + eps)
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


_B1, _B2, _EPS = 0.9, 0.999, 1e-8


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
        m1 = _B1 * m1 + (1 - _B1) * g
        m2 = _B2 * m2 + (1 - _B2) * g * g
        z = z - lr * (m1 / (1 - _B1**t)) / (np.sqrt(m2 / (1 - _B2**t)) + _EPS)
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
