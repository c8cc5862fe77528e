"""Compare two adapters module by module, from their factors (never a dense ΔW for the norms).

For a module present in both, with ``ΔW_X = s_X B_X A_X``:

- ``norm_a``, ``norm_b``: ‖ΔW_A‖_F, ‖ΔW_B‖_F; ``norm_ratio`` = ‖ΔW_B‖/‖ΔW_A‖;
- ``cosine`` = ⟨ΔW_A, ΔW_B⟩_F / (‖ΔW_A‖‖ΔW_B‖);
- ``rel_diff`` = ‖ΔW_A − ΔW_B‖_F / ‖ΔW_A‖_F;
- ``overlap``: mean squared cosine of the principal angles between the column spaces of ΔW_A and ΔW_B
  (1 = same output subspace, 0 = orthogonal), with ``min_cosine`` the worst angle's cosine.

‖X − Y‖² = ‖X‖² + ‖Y‖² − 2⟨X, Y⟩ is evaluated in float64 from the Gram matrices; when it cancels
(the difference is below 1e-3 of the norms, e.g. the same adapter in two dialects) the difference is
recomputed without cancellation as the Frobenius norm of the small core ``R_p R_qᵀ`` of the QR
factorizations of ``[s_A B_A, −s_B B_B]`` and ``[A_A; A_B]ᵀ`` (float64), accurate to ~1e-12 relative.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .. import arch, linalg
from ..adapter import Adapter, LoraModule
from ..formats.layout import align, layout_of

#: below this (‖X−Y‖²/(‖X‖²+‖Y‖²)) the Gram formula has cancelled too much: recompute via the core
_CANCELLATION = 1e-6


def _factors64(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s·B, A)`` in float64, flattened to 2-D."""
    b, a = m.factors(dtype=torch.float64)
    return b * m.scale, a


def _norm2(p: torch.Tensor, q: torch.Tensor) -> float:
    """‖P Q‖²_F from the Gram matrices (:func:`lora_merge.linalg.inner_product` of the module with itself)."""
    return max(linalg.inner_product(p, q, p, q), 0.0)


def difference_norm(p1, q1, p2, q2) -> float:
    """‖P1 Q1 − P2 Q2‖_F without cancellation: Frobenius norm of the QR core of the stacked factors."""
    p = torch.cat([p1, -p2], dim=1)
    q = torch.cat([q1, q2], dim=0)
    if p.shape[1] == 0:
        return 0.0
    _, rp = torch.linalg.qr(p)
    _, rq = torch.linalg.qr(q.T)
    return float(torch.linalg.matrix_norm(rp @ rq.T))


def _column_basis(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of P Q (directions with σ > 1e-6·σ_max)."""
    u, s, _ = linalg.core_svd(p, q)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    return u[:, s > s[0] * 1e-6]


def compare_modules(ma: LoraModule, mb: LoraModule) -> dict[str, Any]:
    """All per-module numbers for two modules with the same name (see the module docstring)."""
    row: dict[str, Any] = {
        "name": ma.name,
        "block": arch.block_of(ma.name),
        "rank_a": ma.rank,
        "rank_b": mb.rank,
        "alpha_a": ma.effective_alpha,
        "alpha_b": mb.effective_alpha,
        "scale_a": ma.scale,
        "scale_b": mb.scale,
        "shape_a": list(ma.weight_shape),
        "shape_b": list(mb.weight_shape),
    }
    if ma.weight_shape != mb.weight_shape:
        row.update(comparable=False, norm_a=None, norm_b=None, diff_norm=None, inner=None, rel_diff=None,
                   cosine=None, norm_ratio=None, overlap=None, min_cosine=None)
        return row
    pa, qa = _factors64(ma)
    pb, qb = _factors64(mb)
    na2, nb2 = _norm2(pa, qa), _norm2(pb, qb)
    inner = linalg.inner_product(pa, qa, pb, qb)
    d2 = na2 + nb2 - 2.0 * inner
    if pa.shape == pb.shape and torch.equal(pa, pb) and torch.equal(qa, qb):
        diff = 0.0  # identical factors (e.g. the same file twice)
    elif d2 <= _CANCELLATION * (na2 + nb2):
        diff = difference_norm(pa, qa, pb, qb)
    else:
        diff = math.sqrt(d2)
    na, nb = math.sqrt(na2), math.sqrt(nb2)
    ua, ub = _column_basis(pa, qa), _column_basis(pb, qb)
    cos = linalg.principal_angle_cosines(ua, ub).double()
    k = min(ua.shape[1], ub.shape[1])
    row.update(
        comparable=True,
        norm_a=na,
        norm_b=nb,
        diff_norm=diff,
        inner=inner,
        rel_diff=_rel(diff, na),
        cosine=inner / (na * nb) if na > 0 and nb > 0 else None,
        norm_ratio=nb / na if na > 0 else (None if nb > 0 else 1.0),
        overlap=float((cos[:k] ** 2).sum() / k) if k else None,
        min_cosine=float(cos[:k].min()) if k else None,
    )
    return row


def _rel(diff: float, norm_a: float) -> float:
    if norm_a > 0:
        return diff / norm_a
    return 0.0 if diff == 0 else math.inf


def _module_norm(m: LoraModule) -> float:
    return linalg.frobenius_norm(*_factors64(m))


def _compare_extra(a: Adapter, b: Adapter) -> dict[str, Any]:
    """Non-LoRA tensors (PEFT ``modules_to_save`` heads): names on one side, shape changes, dense rel diff."""
    ka, kb = set(a.extra_tensors), set(b.extra_tensors)
    rows = []
    for k in sorted(ka & kb):
        ta, tb = a.extra_tensors[k], b.extra_tensors[k]
        row: dict[str, Any] = {"name": k, "shape_a": list(ta.shape), "shape_b": list(tb.shape)}
        if tuple(ta.shape) != tuple(tb.shape):
            row.update(comparable=False, rel_diff=None)
        else:
            xa, xb = ta.load(torch.float64), tb.load(torch.float64)
            na = float(xa.norm())
            row.update(comparable=True, norm_a=na, norm_b=float(xb.norm()), rel_diff=_rel(float((xa - xb).norm()), na))
        rows.append(row)
    return {"only_in_a": sorted(ka - kb), "only_in_b": sorted(kb - ka), "common": rows}


def diff_adapters(a: Adapter, b: Adapter, *, top: int = 10, progress=None) -> dict[str, Any]:
    """Compare adapter ``a`` (the reference) with ``b``; a JSON-able dict.

    Keys: ``only_in_a``/``only_in_b`` (with each module's ‖ΔW‖), ``changes`` (rank/alpha/shape),
    ``modules`` (every common module's row, see :func:`compare_modules`), ``blocks`` (aggregates that
    treat a block's modules as one long vector), ``total`` (the same over all common modules),
    ``top`` (the ``top`` common modules with the largest ``rel_diff``), ``extra_tensors`` (non-LoRA
    tensors such as PEFT ``modules_to_save`` heads, compared densely, with their own ``max_rel_diff``),
    and ``max_rel_diff`` over the common LoRA modules (inf when a module's shape changed).
    ``progress`` optionally wraps the iterable of common module names (a progress bar).
    """
    if layout_of(a) != layout_of(b):  # e.g. a kohya Flux LoRA (fused qkv) and a diffusers one (split q/k/v)
        a, b = align(a, None, layout="diffusers"), align(b, None, layout="diffusers")
    names_a, names_b = set(a.modules), set(b.modules)
    common = [n for n in a.modules if n in names_b]
    it = progress(common) if progress is not None else common
    rows = [compare_modules(a[n], b[n]) for n in it]

    changes = []
    for r in rows:
        what = [f for f, x, y in (("rank", r["rank_a"], r["rank_b"]), ("alpha", r["alpha_a"], r["alpha_b"]),
                                  ("shape", r["shape_a"], r["shape_b"])) if x != y]
        if what:
            changes.append({"name": r["name"], "changed": what, **{k: r[k] for k in (
                "rank_a", "rank_b", "alpha_a", "alpha_b", "shape_a", "shape_b")}})

    blocks: dict[str, dict[str, float]] = {}
    for r in rows:
        if not r["comparable"]:
            continue
        agg = blocks.setdefault(r["block"], {"modules": 0, "na2": 0.0, "nb2": 0.0, "inner": 0.0, "d2": 0.0})
        agg["modules"] += 1
        agg["na2"] += r["norm_a"] ** 2
        agg["nb2"] += r["norm_b"] ** 2
        agg["inner"] += r["inner"]
        agg["d2"] += r["diff_norm"] ** 2
    block_rows = [{"block": k, **_aggregate(v)} for k, v in blocks.items()]
    total = _aggregate({
        "modules": sum(v["modules"] for v in blocks.values()),
        **{f: sum(v[f] for v in blocks.values()) for f in ("na2", "nb2", "inner", "d2")},
    })

    comparable = [r for r in rows if r["comparable"]]
    ranked = sorted(comparable, key=lambda r: r["rel_diff"], reverse=True)
    extra = _compare_extra(a, b)
    rels = [r["rel_diff"] for r in comparable]
    if any(not r["comparable"] for r in rows):
        rels.append(math.inf)
    extra_rels = [e["rel_diff"] if e["comparable"] else math.inf for e in extra["common"]]
    extra["max_rel_diff"] = max(extra_rels) if extra_rels else None
    return {
        "a": _side(a),
        "b": _side(b),
        "num_common": len(common),
        "only_in_a": [{"name": n, "norm": _module_norm(a[n])} for n in a.modules if n not in names_b],
        "only_in_b": [{"name": n, "norm": _module_norm(b[n])} for n in b.modules if n not in names_a],
        "changes": changes,
        "modules": rows,
        "blocks": block_rows,
        "total": total,
        "top": ranked[: max(int(top), 0)],
        "extra_tensors": extra,
        "max_rel_diff": max(rels) if rels else 0.0,
    }


def _aggregate(v: dict[str, float]) -> dict[str, Any]:
    na, nb = math.sqrt(v["na2"]), math.sqrt(v["nb2"])
    diff = math.sqrt(v["d2"])
    return {
        "modules": int(v["modules"]),
        "norm_a": na,
        "norm_b": nb,
        "diff_norm": diff,
        "rel_diff": _rel(diff, na),
        "cosine": v["inner"] / (na * nb) if na > 0 and nb > 0 else None,
        "norm_ratio": nb / na if na > 0 else None,
    }


def _side(ad: Adapter) -> dict[str, Any]:
    return {
        "file": str(ad.source) if ad.source is not None else None,
        "dialect": ad.dialect,
        "dialect_variant": ad.dialect_variant,
        "architecture": arch.guess_arch(ad),
        "num_modules": len(ad),
    }


def exceeds(result: dict[str, Any], threshold: float) -> bool:
    """What ``--fail-above`` checks: a LoRA module on one side only, or ``max_rel_diff > threshold``.

    Non-LoRA tensors (``modules_to_save`` heads) are reported but do not count: the kohya and diffusers
    dialects cannot hold them, so converting a PEFT adapter there drops them by design (with a warning).
    """
    return bool(result["only_in_a"] or result["only_in_b"]) or result["max_rel_diff"] > threshold


def extra_tensors_differ(result: dict[str, Any], threshold: float) -> bool:
    """Whether the non-LoRA tensors differ (one side only, shape change, or above ``threshold``)."""
    e = result["extra_tensors"]
    return bool(e["only_in_a"] or e["only_in_b"]) or (e["max_rel_diff"] is not None and e["max_rel_diff"] > threshold)
