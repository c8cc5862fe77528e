"""Small pure functions on LoRA factors.  All linear algebra runs in fp32 (or fp64 when given).

Nothing here forms a dense ``d_out × d_in`` matrix unless its name says so.
"""
from __future__ import annotations

import torch


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def concat_factors(
    ups: list[torch.Tensor], downs: list[torch.Tensor], coeffs: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank concatenation: ``Σ c_i B_i A_i = [B_1 … B_n] · [c_1 A_1; …; c_n A_n]`` (algorithms.md §2)."""
    b = torch.cat([_f32(u) for u in ups], dim=1)
    a = torch.cat([_f32(d) * float(c) for d, c in zip(downs, coeffs)], dim=0)
    return b, a


#: the Gram route is used only when every kept direction is well resolved in fp64: cond(B)² ≤ 1e8 and
#: σ_k² ≥ 1e-10·σ_1² (otherwise Householder QR, which never squares the condition number)
_GRAM_COND2 = 1e-8
_GRAM_SPREAD = 1e-10


def _core_svd_qr(up: torch.Tensor, down: torch.Tensor):
    qp, rp = torch.linalg.qr(up)  # d_out × k1, k1 × R
    qq, rq = torch.linalg.qr(down.T)  # d_in × k2, k2 × R
    core = rp @ rq.T  # k1 × k2
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    return qp @ uc, s, vch @ qq.T


def _core_svd_gram(up: torch.Tensor, down: torch.Tensor, k: int):
    """Top-``k`` SVD of ``up @ down`` from the two ``R×R`` Gram matrices (fp64), or None when ill-conditioned.

    With ``BᵀB = L Lᵀ`` (Cholesky), ``B = Q_B Lᵀ`` for an orthonormal ``Q_B``, so
    ``(BA)(BA)ᵀ = Q_B (Lᵀ A Aᵀ L) Q_Bᵀ``: the eigenpairs ``(σ², W)`` of the small ``H = Lᵀ (A Aᵀ) L`` give
    ``U = B L⁻ᵀ W`` and ``Vᵀ = Σ⁻¹ Wᵀ Lᵀ A``.  Two tall GEMMs instead of two Householder QRs.
    """
    p64, q64 = up.double(), down.double()
    g1 = p64.T @ p64
    g2 = q64 @ q64.T
    l1, info = torch.linalg.cholesky_ex(g1)
    if int(info) != 0:
        return None
    d = l1.diagonal()
    if float(d.min()) ** 2 < _GRAM_COND2 * float(d.max()) ** 2:
        return None
    lam, w = torch.linalg.eigh(l1.T @ g2 @ l1)
    lam, w = lam.flip(0)[:k], w.flip(1)[:, :k]
    if not float(lam[-1]) > _GRAM_SPREAD * float(lam[0]):
        return None
    s = lam.sqrt()
    x = torch.linalg.solve_triangular(l1.T, w, upper=True)  # L⁻ᵀ W
    y = (w.T @ l1.T) / s[:, None]  # Σ⁻¹ Wᵀ Lᵀ
    dt = up.dtype
    return up @ x.to(dt), s.to(dt), y.to(dt) @ down


def _core_svd_top(up: torch.Tensor, down: torch.Tensor, k: int | None):
    """``core_svd`` truncated to ``k`` directions (all when None), via the Gram route when it is safe."""
    up, down = _f32(up), _f32(down)
    r = up.shape[1]
    if r == 0:
        z = up.new_zeros
        return z((up.shape[0], 0)), z((0,)), z((0, down.shape[1]))
    if r <= min(up.shape[0], down.shape[1]) and (k is None or k > 0):
        res = _core_svd_gram(up, down, r if k is None else min(int(k), r))
        if res is not None:
            return res
    u, s, vh = _core_svd_qr(up, down)
    if k is not None:
        u, s, vh = u[:, :k], s[:k], vh[:k]
    return u, s, vh


def core_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``up @ down`` without forming it: returns ``U (d_out×R), S (R), Vh (R×d_in)``.

    From the ``R×R`` Gram matrices ``BᵀB``, ``AAᵀ`` in fp64 (Cholesky + a symmetric eigenproblem) when
    that is well conditioned; otherwise QR of both factors, then an SVD of the small ``R×R`` core
    (algorithms.md §3).  Cost ``O((d_out + d_in)·R² + R³)`` either way.
    """
    return _core_svd_top(up, down, None)


def refactor(
    up: torch.Tensor, down: torch.Tensor, rank: int | None = None, split: str = "sqrt"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorization of ``up @ down`` (Eckart–Young), from the factors alone.

    ``split='sqrt'`` gives ``B = U√Σ, A = √Σ Vᵀ`` (balanced factors); ``split='up'`` puts Σ into B
    (kohya's convention).  ``rank=None`` keeps every non-negligible singular value's direction, i.e.
    the exact product at rank ``min(R, d_out, d_in)``.
    """
    if split not in ("up", "sqrt"):
        raise ValueError(f"unknown split {split!r}")
    u, s, vh = _core_svd_top(up, down, None if rank is None else int(rank))
    if split == "up":
        return u * s[None, :], vh
    rs = s.sqrt()
    return u * rs[None, :], rs[:, None] * vh


def refactor_dense(delta: torch.Tensor, rank: int | None = None, split: str = "sqrt") -> tuple[torch.Tensor, torch.Tensor]:
    """Factor a dense 2-D update (used when a strategy returns a dense ΔW, e.g. TIES/DARE).

    ``rank=None`` keeps the numerical rank (singular values above ``max(d)·eps·σ_max``), so the result is
    exact to fp32 precision.
    """
    delta = _f32(delta)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    if rank is None:
        tol = s.max().clamp_min(0) * max(delta.shape) * torch.finfo(s.dtype).eps if s.numel() else 0.0
        k = int((s > tol).sum()) if s.numel() else 0
    else:
        k = min(int(rank), s.shape[0])
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if split == "up":
        return u * s[None, :], vh
    rs = s.sqrt()
    return u * rs[None, :], rs[:, None] * vh


def singular_values(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Singular values of ``up @ down`` from the factors (descending)."""
    return core_svd(up, down)[1]


def frobenius_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """‖B A‖_F without forming BA: ``sqrt(Σ (BᵀB) ⊙ (A Aᵀ))``."""
    up, down = _f32(up), _f32(down)
    g = (up.T @ up) * (down @ down.T)
    return float(g.sum().clamp_min(0).sqrt())


def inner_product(up1: torch.Tensor, down1: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor) -> float:
    """⟨B1 A1, B2 A2⟩_F = tr(A1ᵀ B1ᵀ B2 A2) = Σ (B1ᵀB2) ⊙ (A1 A2ᵀ)."""
    return float(((_f32(up1).T @ _f32(up2)) * (_f32(down1) @ _f32(down2).T)).sum())


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(H(σ/Σσ))``; 0 for a zero update."""
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def principal_angle_cosines(basis1: torch.Tensor, basis2: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of two matrices (descending)."""
    if basis1.shape[1] == 0 or basis2.shape[1] == 0:
        return basis1.new_zeros((0,))
    q1, _ = torch.linalg.qr(_f32(basis1))
    q2, _ = torch.linalg.qr(_f32(basis2))
    return torch.linalg.svdvals(q1.T @ q2).clamp(0, 1)
