"""Task-vector operations on dense per-layer updates ``τ_i`` (``ΔW_i``), in the style of PEFT's
``merge_utils.py``: small pure tensor functions, no I/O, no registry.  ``ties``, ``dare`` and
``magnitude-prune`` are written as named steps over these (docs/algorithms.md §4):

* trim: :func:`topk_mask` / :func:`prune` keep the ``int(density · numel)`` largest ``|entries|``;
* drop and rescale: :func:`dare_drop`;
* elect sign: :func:`elect_sign`;
* disjoint merge: :func:`disjoint_merge`;
* the inputs as task vectors: :func:`unweighted_taus`, :func:`weighted_sum`, and :func:`zero_layer` for a
  layer no input contributes to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from .base import LayerInput, LayerResult
from .linear import present

#: sign election on the weighted deltas ``w_i·τ_i`` (mergekit) or on the unweighted ``τ_i`` (PEFT)
SignBasis = Literal["weighted", "unweighted"]
#: the disjoint mean's divisor: the agreeing inputs' count (paper, PEFT), their weight sum (mergekit
#: ``normalize``) or none
Divisor = Literal["count", "weights", "none"]


# ---------------------------------------------------------------- the inputs as task vectors


def unweighted_taus(inputs: Sequence[LayerInput]) -> tuple[list[torch.Tensor], list[float]]:
    """The contributing inputs' dense updates at strength 1 (``scale · B · A``) and their user weights."""
    xs = present(inputs)
    return [x.unweighted_delta() for x in xs], [x.weight for x in xs]


def contributing(inputs: Sequence[LayerInput]) -> list[int]:
    """Positions in ``inputs`` of the inputs :func:`unweighted_taus` returns, in the same order."""
    kept = {id(x) for x in present(inputs)}
    return [i for i, x in enumerate(inputs) if id(x) in kept]


def dense_sum(inputs: Sequence[LayerInput]) -> torch.Tensor:
    """``Σ w_i s_i B_i A_i`` formed densely (zeros when no input contributes)."""
    x = inputs[0]
    total = x.up.new_zeros(x.up.shape[0], x.down.shape[1])
    for x in present(inputs):
        total += x.delta()
    return total


def weighted_sum(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ w_i · τ_i`` (at least one ``τ``)."""
    total = taus[0] * weights[0]
    for t, w in zip(taus[1:], weights[1:]):
        total = total + t * w
    return total


def zero_layer(inputs: Sequence[LayerInput]) -> LayerResult:
    """The result for a layer where no input contributes (all weights 0 or modules absent)."""
    x = inputs[0]
    return LayerResult(dense=x.up.new_zeros(x.up.shape[0], x.down.shape[1]))


# ---------------------------------------------------------------- trim / drop


def topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``int(density · numel)`` largest |entries| (PEFT's ``prune`` convention); among
    entries equal to the threshold, the first ones in memory order.

    The threshold is the k-th largest |entry| by selection (``numpy.partition`` on the CPU: linear time,
    ~40× faster than ``torch.topk`` on an SD layer), then one comparison; the set is ``topk``'s whenever
    the threshold value is not repeated."""
    n = t.numel()
    k = int(density * n)
    flat = t.detach().abs().flatten()
    if k <= 0:
        return torch.zeros_like(t, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(t, dtype=torch.bool)
    if flat.device.type == "cpu":
        thr = flat.new_tensor(float(np.partition(flat.float().numpy(), n - k)[n - k])).to(flat.dtype)
    else:
        thr = torch.kthvalue(flat, n - k + 1).values
    mask = flat > thr
    short = k - int(mask.sum())
    if short > 0:
        mask[(flat == thr).nonzero().flatten()[:short]] = True
    return mask.view_as(t)


def prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Magnitude pruning: ``t`` with all but its top-``density`` fraction of entries set to 0."""
    return t * topk_mask(t, density)


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale kept ones by ``1/density``
    (density 0 gives zeros, not NaN)."""
    if density <= 0.0:
        return torch.zeros_like(tau)
    if density >= 1.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, device=tau.device, dtype=torch.float32) < density
    return tau * keep / density


# ---------------------------------------------------------------- elect sign / disjoint merge


def elect_sign(basis: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign of the sum over inputs (dimension 0) of ``basis``: the majority by mass."""
    return torch.sign(basis.sum(0))


def disjoint_merge(
    taus: Sequence[torch.Tensor], weights: Sequence[float], sign: SignBasis, divide: Divisor
) -> torch.Tensor:
    """Elect a sign per entry and combine the agreeing (non-zero, same-sign) weighted entries.

    ``sign`` picks what votes (``w_i·τ_i`` or ``τ_i``); agreement is judged on the same values.
    ``divide`` is the disjoint mean's divisor; an entry no input agrees on is 0."""
    if sign not in ("weighted", "unweighted"):
        raise ValueError(f"unknown sign basis {sign!r}")
    if divide not in ("count", "weights", "none"):
        raise ValueError(f"unknown divisor {divide!r}")
    stack = torch.stack(list(taus))
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.dim() - 1)))
    weighted = stack * w
    basis = weighted if sign == "weighted" else stack
    elected = elect_sign(basis)
    # agreement judged where the vote was taken: same sign as the elected one and not 0, i.e. a positive
    # product; as 0/1 floats, whose sums are several times faster than a bool tensor's (same values)
    agree = ((basis * elected) > 0).to(stack.dtype)
    total = (weighted * agree).sum(0)
    if divide == "count":
        total = total / agree.sum(0).clamp_min(1)
    elif divide == "weights":
        wsum = (w * agree).sum(0)
        total = torch.where(wsum != 0, total / torch.where(wsum != 0, wsum, torch.ones_like(wsum)), 0.0)
    return total
