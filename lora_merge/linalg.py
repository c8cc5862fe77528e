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


def core_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``up @ down`` without forming it: returns ``U (d_out×R), S (R), Vh (R×d_in)``.

    QR of both factors, then an SVD of the small ``R×R`` core (algorithms.md §3).  Cost
    ``O((d_out + d_in)·R² + R³)``.
    """
    up, down = _f32(up), _f32(down)
    r = up.shape[1]
    if r == 0:
        z = up.new_zeros
        return z((up.shape[0], 0)), z((0,)), z((0, down.shape[1]))
    qp, rp = torch.linalg.qr(up)  # d_out × k1, k1 × R
    qq, rq = torch.linalg.qr(down.T)  # d_in × k2, k2 × R
    core = rp @ rq.T  # k1 × k2
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    return qp @ uc, s, vch @ qq.T


def refactor(
    up: torch.Tensor, down: torch.Tensor, rank: int | None = None, split: str = "sqrt"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorization of ``up @ down`` (Eckart–Young), from the factors alone.

    ``split='sqrt'`` gives ``B = U√Σ, A = √Σ Vᵀ`` (balanced factors); ``split='up'`` puts Σ into B
    (kohya's convention).  ``rank=None`` keeps every non-negligible singular value's direction, i.e.
    the exact product at rank ``min(R, d_out, d_in)``.
    """
    u, s, vh = core_svd(up, down)
    k = s.shape[0] if rank is None else min(int(rank), s.shape[0])
    u, s, vh = u[:, :k], s[:k], vh[:k]
    if split == "up":
        return u * s[None, :], vh
    if split != "sqrt":
        raise ValueError(f"unknown split {split!r}")
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
