"""One layer's mask problem: folding masks into the factors, the loss terms, and the quadratic
objective with its closed-form minimizer (the Adam refinement is in :mod:`lora_merge.masks.optimizer`).

See :mod:`lora_merge.masks` for the mask families and the objective.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch

from ..input_models import InputModel

#: which dimension a mask scales: output rows, input columns or the rank (docs/algorithms.md §2)
MaskAxis = Literal["out", "in", "rank"]
AXES: tuple[MaskAxis, ...] = get_args(MaskAxis)

# ---------------------------------------------------------------- folding (docs/algorithms.md §2)


def fold(
    axis: MaskAxis, up: torch.Tensor, down: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
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
    axis: MaskAxis,
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


def dense_masked_sum(
    axis: MaskAxis, delta_c: torch.Tensor, delta_s: torch.Tensor, mask_c, mask_s
) -> torch.Tensor:
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

    axis: MaskAxis
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
    axis: MaskAxis,
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
