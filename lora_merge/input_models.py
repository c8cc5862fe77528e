"""Input models for the weight-space objectives: the second moments ``Σ_c``, ``Σ_s`` of the inputs that a
layer sees when the content (resp. style) LoRA matters (docs/algorithms.md §8).

Every model is handed to the mask math as a *factor* ``L`` with ``Σ = L Lᵀ`` (``d_in × k``) or ``None``
for the identity, so that all quantities the objectives need are small Gram products
``X Σ Yᵀ = (X L)(Y L)ᵀ`` of ``r × d_in`` factors — a ``d_in × d_in`` matrix is never formed for the
``subspace`` and ``identity`` models.

* ``subspace`` (default): ``Σ_c`` is the orthogonal projector onto the row space of the content LoRA's
  ``A`` (the inputs the content LoRA responds to), ``Σ_s`` likewise for the style LoRA.  A projector
  does not depend on how a LoRA happens to be factored (``B A = (B G)(G⁻¹ A)``), and its trace is the
  LoRA's rank.  The two LoRAs weigh equally because every reconstruction term is divided by the
  reference energy ``‖ΔW_c X_c‖²`` (``‖ΔW_s X_s‖²``), i.e. the objective works with relative errors and the
  overall scale of ``Σ`` drops out.
* ``identity``: ``Σ_c = Σ_s = I`` (isotropic inputs; the optimum is close to the average of the updates).
* ``stats``: second moments measured from real activations, read from a safetensors file
  (:func:`save_stats` / :func:`load_stats`, format in docs/ziplora-duolora.md).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import FormatError, MergeError, UsageError
from .files import atomic_write, refuse_existing

INPUT_MODELS = ("subspace", "identity", "stats")
STATS_FORMAT = "lora-merge.input-stats/1"

# ---------------------------------------------------------------- factors


def row_space_basis(a: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (``d_in × k``) of the row space of ``a`` (``r × d_in``), from the ``r × r`` Gram.

    ``A Aᵀ = U Λ Uᵀ`` gives ``L = Aᵀ U Λ^{-1/2}`` over the eigenvalues above ``rtol·λ_max``; then
    ``L Lᵀ`` is the projector onto the row space.  Cost ``O(r² d_in)``.
    """
    a = a.to(torch.float64)
    if a.shape[0] == 0:
        return a.new_zeros((a.shape[1], 0))
    lam, u = torch.linalg.eigh(a @ a.T)
    keep = lam > rtol * lam.max().clamp_min(0)
    if not bool(keep.any()):
        return a.new_zeros((a.shape[1], 0))
    return a.T @ (u[:, keep] / lam[keep].sqrt())


def gram(x: torch.Tensor, y: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """``X Σ Yᵀ`` with ``Σ = L Lᵀ`` (``factor = L``) or ``Σ = I`` (``factor = None``)."""
    if factor is None:
        return x @ y.T
    x, y = x.to(factor.dtype), y.to(factor.dtype)
    return (x @ factor) @ (y @ factor).T


# ---------------------------------------------------------------- models


class InputModel:
    """Gives ``Σ_c``, ``Σ_s`` for one layer (``module`` is the canonical module path), either as factors
    ``(L_c, L_s)`` or directly as the Gram matrices ``(Q Σ_c Qᵀ, Q Σ_s Qᵀ)`` of a stacked factor ``Q``."""

    name: str = ""

    def grams(self, module: str, down_c: torch.Tensor, down_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q Σ_c Qᵀ, Q Σ_s Qᵀ)`` in fp64 for ``Q = [Â_c; Â_s]`` (the content's rows first)."""
        lc, ls = self.factors(module, down_c, down_s)
        q = torch.cat([down_c, down_s], 0)
        return gram(q, q, lc).double(), gram(q, q, ls).double()

    def factors(
        self, module: str, content_down: torch.Tensor, style_down: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"input_model": self.name}


def _stacked_gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[x; y][x; y]ᵀ`` in fp64 without concatenating the (wide) factors."""
    xx, xy, yy = x @ x.T, x @ y.T, y @ y.T
    return torch.cat([torch.cat([xx, xy], 1), torch.cat([xy.T, yy], 1)], 0).double()


def _projected_gram(k: torch.Tensor, idx: slice, rtol: float = 1e-10) -> torch.Tensor:
    """``Q P Qᵀ`` for the projector ``P`` onto the row space of ``Q[idx]``, from ``K = Q Qᵀ`` alone:
    ``K[:, idx] K[idx, idx]⁻¹ K[idx, :]`` (no ``d_in``-sized work).  A relative ridge ``rtol`` keeps a
    rank-deficient block well defined (directions without energy get no weight)."""
    kk = k[idx, idx]
    if kk.numel() == 0:
        return k.new_zeros(k.shape)
    top = float(kk.diagonal().max())
    if not math.isfinite(top) or not bool(torch.isfinite(k).all()):
        raise MergeError("the inputs' values are too large for the input model's arithmetic (its Gram matrix "
                         "overflows); check the inputs' factors and alphas")
    if top <= 0:
        return k.new_zeros(k.shape)
    kk = 0.5 * (kk + kk.T) + (rtol * top) * torch.eye(kk.shape[0], dtype=kk.dtype)
    chol, info = torch.linalg.cholesky_ex(kk)
    if int(info) != 0:  # not positive definite even with the ridge: fall back to an eigen-decomposition
        try:
            lam, u = torch.linalg.eigh(kk)
        except torch.linalg.LinAlgError:
            raise MergeError("the input model's eigen-decomposition failed on the inputs' values (too large or "
                             "degenerate); check the inputs' factors and alphas") from None
        keep = lam > rtol * top
        x = k[:, idx] @ (u[:, keep] / lam[keep].sqrt())
        return x @ x.T
    xt = torch.linalg.solve_triangular(chol, k[idx, :], upper=False)
    return xt.T @ xt


class SubspaceModel(InputModel):
    name = "subspace"

    def grams(self, module, down_c, down_s):
        k = _stacked_gram(down_c, down_s)
        rc = down_c.shape[0]
        return _projected_gram(k, slice(0, rc)), _projected_gram(k, slice(rc, k.shape[0]))

    def factors(self, module, content_down, style_down):
        return row_space_basis(content_down), row_space_basis(style_down)


class IdentityModel(InputModel):
    name = "identity"

    def grams(self, module, down_c, down_s):
        k = _stacked_gram(down_c, down_s)
        return k, k

    def factors(self, module, content_down, style_down):
        return None, None


@dataclass
class StatsModel(InputModel):
    """Second moments per layer from a stats file.  A layer missing from the file is an error."""

    path: Path
    entries: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = "stats"

    def factors(self, module, content_down, style_down):
        ent = self.entries.get(module)
        if ent is None and module.startswith("unet."):
            ent = self.entries.get(module[len("unet."):])
        if ent is None:
            raise UsageError(f"input statistics have no entry for layer {module!r}", self.path)
        d_in = content_down.shape[1] if content_down.shape[0] else style_down.shape[1]
        out = []
        for role in ("content", "style"):
            lf = ent[role]
            if lf.shape[0] != d_in:
                raise UsageError(
                    f"input statistics for {module}.{role} are {lf.shape[0]}-wide, the layer reads {d_in}", self.path
                )
            out.append(lf)
        return out[0], out[1]

    def describe(self) -> dict:
        return {"input_model": "stats", "stats": os.fspath(self.path), "stats_metadata": self.metadata}


def _psd_factor(sigma: torch.Tensor, rtol: float = 1e-9) -> torch.Tensor:
    """``L`` with ``L Lᵀ = Σ`` for a symmetric PSD ``Σ`` (negative round-off eigenvalues dropped)."""
    s = 0.5 * (sigma + sigma.T).to(torch.float64)
    lam, v = torch.linalg.eigh(s)
    keep = lam > rtol * lam.abs().max().clamp_min(1e-300)
    return v[:, keep] * lam[keep].sqrt()


def save_stats(
    path: str | os.PathLike,
    stats: Mapping[str, Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]],
    counts: Mapping[str, int] | None = None,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Write per-layer second moments.

    ``stats[module]["content"|"style"]`` is either a ``d_in × d_in`` matrix ``E[x xᵀ]`` or a low-rank pair
    ``(U, S)`` (``d_in × k``, ``k``) meaning ``Σ ≈ U diag(S) Uᵀ``.  ``counts`` are the numbers of input
    vectors averaged for ``content`` / ``style`` (stored in the metadata).  Written atomically.
    """
    from safetensors.torch import save

    path = Path(path)
    refuse_existing(path, force)
    tensors: dict[str, torch.Tensor] = {}
    for module, roles in stats.items():
        for role in ("content", "style"):
            if role not in roles:
                raise UsageError(f"stats for {module!r} lack the {role!r} moment")
            val = roles[role]
            if isinstance(val, (tuple, list)):
                u, s = val
                tensors[f"{module}.{role}.U"] = u.detach().float().cpu().clone().contiguous()
                tensors[f"{module}.{role}.S"] = s.detach().float().cpu().clone().contiguous()
            else:
                tensors[f"{module}.{role}"] = val.detach().float().cpu().clone().contiguous()
    md = {"format": STATS_FORMAT}
    if counts:
        md["counts"] = json.dumps({k: int(v) for k, v in counts.items()})
    md.update({k: str(v) for k, v in (metadata or {}).items()})
    return atomic_write(path, lambda fh: fh.write(save(tensors, metadata=md)))


def load_stats(path: str | os.PathLike) -> StatsModel:
    """Read a stats file into a :class:`StatsModel` (factors precomputed, fp64)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError("input statistics file not found", path)
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            md = dict(f.metadata() or {})
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several (private) types for a bad file
        raise FormatError(f"not a safetensors stats file ({exc})", path) from None
    if md.get("format") != STATS_FORMAT:
        raise FormatError(f"metadata 'format' is {md.get('format')!r}, expected {STATS_FORMAT!r}", path)
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in raw.items():
        for role in ("content", "style"):
            for suffix, kind in ((f".{role}", "full"), (f".{role}.U", "U"), (f".{role}.S", "S")):
                if key.endswith(suffix):
                    module = key[: -len(suffix)]
                    parts.setdefault(module, {}).setdefault(role, {})[kind] = t
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for module, roles in parts.items():
        ent = {}
        for role in ("content", "style"):
            p = roles.get(role)
            if p is None:
                raise FormatError(f"layer {module!r} has no {role!r} moment", path)
            if "full" in p:
                sig = p["full"]
                if sig.ndim != 2 or sig.shape[0] != sig.shape[1]:
                    raise FormatError(f"{module}.{role} must be square, got {tuple(sig.shape)}", path)
                ent[role] = _psd_factor(sig)
            elif "U" in p and "S" in p:
                u, s = p["U"].to(torch.float64), p["S"].to(torch.float64)
                if u.ndim != 2 or s.ndim != 1 or u.shape[1] != s.shape[0]:
                    raise FormatError(f"{module}.{role}.U/.S have mismatched shapes", path)
                ent[role] = u * s.clamp_min(0).sqrt()[None, :]
            else:
                raise FormatError(f"{module}.{role} needs both .U and .S", path)
        entries[module] = ent
    return StatsModel(path=path, entries=entries, metadata=md)


def resolve_input_model(spec: str | InputModel, stats: str | os.PathLike | None = None) -> InputModel:
    """``subspace`` | ``identity`` | ``stats`` (with ``stats=PATH``) or an :class:`InputModel`."""
    if isinstance(spec, InputModel):
        return spec
    if spec == "subspace":
        return SubspaceModel()
    if spec == "identity":
        return IdentityModel()
    if spec == "stats":
        if not stats:
            raise UsageError("input model 'stats' needs a statistics file (--stats FILE)")
        return load_stats(stats)
    raise UsageError(f"unknown input model {spec!r}; choose one of {', '.join(INPUT_MODELS)}")
