"""The layer loop: every planned layer through the strategy (or its direct kernel), finished to the
requested rank and cast to the output dtype.

Layers are processed one at a time: each input's factors for a layer are loaded, merged and dropped, so
peak memory stays near a few layers plus the output.  Heavy finishing work (re-factorization, dense
SVD, the retention report) runs on worker threads, at most two layers per worker in flight, inserted in
plan order.  Every layer's tensor work runs with one torch thread and one BLAS thread, so the output
does not depend on the number of workers (BLAS reductions can round differently with more threads).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from .. import linalg
from ..adapter import LoraModule
from ..analysis.fidelity import retention
from ..errors import MergeError
from ..files import check_interrupt
from ..strategies import LayerInput, LayerResult, MergeStrategy, PlannedLayer
from .plan import Plan
from .recipe import ProgressFn

__all__ = ["REFACTOR_TOL", "LayerRun", "dense_default_rank", "finish_dense", "finish_layer", "run_layers",
           "worker_count"]

#: relative accuracy a re-factorization needs for an output dtype: a quarter of its unit roundoff (the
#: rounding of the stored factors is then the larger error); fp32 and fp64 outputs get fp64 Gram matrices
REFACTOR_TOL = {torch.float16: 2.0**-11 / 4, torch.bfloat16: 2.0**-8 / 4}


def worker_count(threads: int | None, dev: torch.device) -> int:
    """Worker threads for the layer loop: 1 off the CPU; default every CPU this process may use."""
    if dev.type != "cpu":
        return 1
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            threads = os.cpu_count() or 1
    return max(1, int(threads))


def finish_layer(result: LayerResult, rank: int | None, tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Factors of the strategy's answer at the requested rank; returns ``(up, down, refactored)``."""
    if result.dense is not None:
        up, down = linalg.refactor_dense(result.dense.float(), rank)
        return up, down, True
    up, down = result.up.float(), result.down.float()
    if rank is not None and up.shape[1] > rank:
        up, down = linalg.refactor(up, down, rank, tol=tol)
        return up, down, True
    return up, down, False


def _no_info(layer: PlannedLayer) -> dict[str, Any]:
    return {}


def dense_default_rank(layer_in: list[LayerInput]) -> int:
    """The rank a dense result (``ties``, ``dare``, ``magnitude-prune``) is re-factored to without
    ``--rank``/``--full-rank``: the sum of the contributing inputs' ranks (what ``linear`` writes)."""
    return max(1, sum(x.rank for x in layer_in if x.present and x.coeff != 0.0))


def finish_dense(dense: torch.Tensor, layer_in: list[LayerInput], rank: int | None,
                 full_rank: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Factors of a dense result: ``--rank K``, every non-negligible direction (``full_rank``) or, by
    default, :func:`dense_default_rank`; with the relative error of what was kept and ‖ΔW‖_F (so the run
    can report the error over all modules)."""
    k = rank if rank is not None else None if full_rank else dense_default_rank(layer_in)
    up, down, err, norm = linalg.refactor_dense_error(dense.float(), k)
    rule = "rank" if rank is not None else "full" if full_rank else "sum"
    return up, down, {"dense_rank_rule": rule, "dense_rel_error": err, "dense_norm": norm}


@dataclass
class LayerRun:
    """What the loop needs besides the plan and the strategy."""

    out_dtype: torch.dtype
    threads: int | None = None
    with_retention: bool = False  # per-layer retention of input 1 and 2 in the report (two inputs)
    #: dense results keep every non-negligible direction (else: --rank, or the sum of the input ranks)
    full_rank: bool = False
    progress: ProgressFn | None = None


def _one_thread() -> None:
    """A worker's first act: one torch (OpenMP, MKL) thread.  ``torch.set_num_threads`` on the main thread
    does not reach a new thread's OpenMP setting until torch lazily copies it there on the thread's first
    parallel op; a GEMM before that ran with every core, rounding its sums differently from ``--threads
    1`` (``dare`` layers differed in the last bits)."""
    torch.set_num_threads(1)


Job = tuple[Callable[..., tuple[dict[str, Any], LoraModule]], tuple]


class _Loop:
    """One run of the loop; its methods are the steps of :func:`run_layers`."""

    def __init__(self, plan: Plan, strategy: MergeStrategy, run: LayerRun):
        self.plan, self.strategy, self.run = plan, strategy, run
        self.tol = REFACTOR_TOL.get(run.out_dtype, 0.0)
        self.kernel = None
        if not run.with_retention:
            self.kernel = strategy.direct_kernel(plan, run.out_dtype, self.tol)
        self.modules: dict[str, LoraModule] = {}
        self.info: dict[str, dict] = {}
        self.done = 0

    # -- per-layer work (pure tensor work: may run on a worker thread)
    def finish(self, layer: PlannedLayer, layer_in: list[LayerInput], result: LayerResult):
        dense_info: dict[str, Any] = {}
        if result.dense is not None:
            up, down, dense_info = finish_dense(result.dense, layer_in, self.plan.rank, self.run.full_rank)
            refactored = True
        else:
            up, down, refactored = finish_layer(result, self.plan.rank, self.tol)
            if refactored and self.plan.rank is not None and result.up is not None:
                rel, norm = linalg.truncation_error([result.up], [result.down], [1.0], up, down)
                dense_info = {"truncation_rank_rule": f"--rank {self.plan.rank}", "truncation_rel_error": rel,
                              "truncation_norm": norm}  # fmt: skip
        info = {"rank": int(up.shape[1]), "weights": list(layer.coeffs), **result.info, **dense_info}
        if refactored:
            info["refactored"] = True
        if self.run.with_retention:
            info["retention"] = retention(up, down, layer_in[0], layer_in[1], input_model="subspace",
                                          module=layer.ctx.name)
        mod = LoraModule.from_factors(layer.ctx.name, up, down, layer.ctx.weight_shape, self.run.out_dtype)
        return info, mod

    def direct(self, layer: PlannedLayer):
        mod, refactored = self.kernel.layer(layer)
        info = {"rank": mod.rank, "weights": list(layer.coeffs), **getattr(self.kernel, "layer_info", _no_info)(layer)}
        if refactored:
            info["refactored"] = True
        return info, mod

    def job(self, layer: PlannedLayer) -> tuple[Job, bool]:
        """The work for a layer and whether it is heavy enough for a worker thread."""
        if self.kernel is not None and self.kernel.applies(layer):
            return (self.direct, (layer,)), bool(self.kernel.heavy)
        layer_in = self.plan.layer_inputs(layer)
        result = self.strategy.merge_layer(layer_in, layer.ctx)
        if not isinstance(result, LayerResult):
            raise TypeError(f"strategy {self.strategy.name!r} returned {type(result).__name__}, not LayerResult")
        heavy = self.plan.rank is not None or result.dense is not None or self.run.with_retention
        return (self.finish, (layer, layer_in, result)), heavy

    def store(self, name: str, info: dict, mod: LoraModule) -> None:
        for t in (mod.up.tensor, mod.down.tensor):
            if t is not None and not linalg.all_finite(t):
                self.plan.check_inputs(name)  # a NaN/Inf in an input file: a FormatError naming it
                raise MergeError(f"module {name}: the merged factors are not finite (the inputs' values are too "
                                 f"large for the arithmetic or for {str(self.run.out_dtype).removeprefix('torch.')}"
                                 " output; try --dtype fp32)")
        self.info[name] = info
        self.modules[name] = mod
        self.done += 1
        if self.run.progress is not None:
            self.run.progress(self.done, len(self.plan), name)

    def loop(self, workers: int) -> None:
        pending: deque = deque()  # (name, future) in plan order; at most 2 per worker in flight
        pool = ThreadPoolExecutor(max_workers=workers, initializer=_one_thread) if workers > 1 else None
        try:
            for layer in self.plan.layers():
                check_interrupt()  # an interrupt that C code swallowed still stops the loop
                (fn, args), heavy = _numerics(layer.ctx.name, self.job, layer)
                if pool is None or not heavy:  # a cast or a copy is not worth a hand-off
                    while pending:  # keep plan order
                        name, fut = pending.popleft()
                        self.store(name, *_numerics(name, fut.result))
                    self.store(layer.ctx.name, *_numerics(layer.ctx.name, fn, *args))
                else:
                    pending.append((layer.ctx.name, pool.submit(fn, *args)))
                    while pending and (len(pending) > 2 * workers or pending[0][1].done()):
                        name, fut = pending.popleft()
                        self.store(name, *_numerics(name, fut.result))
                del fn, args
            while pending:
                name, fut = pending.popleft()
                self.store(name, *_numerics(name, fut.result))
        finally:
            if pool is not None:
                for _, fut in pending:
                    fut.cancel()
                pool.shutdown(wait=True)


def _numerics(name: str, fn: Callable, *args):
    """``fn(*args)``, with a failure of ``torch.linalg`` (values that overflow its arithmetic) as a
    :class:`MergeError` naming the module."""
    try:
        return fn(*args)
    except torch.linalg.LinAlgError as e:
        msg = str(e).strip().splitlines()
        raise MergeError(f"module {name}: the linear algebra failed on its values "
                         f"({msg[0][:200] if msg else type(e).__name__}); are the inputs' values finite and "
                         "of a sane size?") from None


def run_layers(plan: Plan, strategy: MergeStrategy, run: LayerRun) -> tuple[dict[str, LoraModule], dict[str, dict]]:
    """Merge every layer of ``plan`` with ``strategy``: ``(output modules, per-layer report)``.

    While the layers run, torch's intra-op thread count and numpy's BLAS threads are set to 1
    process-wide (restored afterwards)."""
    loop = _Loop(plan, strategy, run)
    torch_threads = torch.get_num_threads()
    blas_limit = threadpool_limits(limits=1, user_api="blas")  # before torch's: restoring it resets OpenMP too
    torch.set_num_threads(1)
    try:
        loop.loop(worker_count(run.threads, plan.device))
    finally:
        blas_limit.restore_original_limits()
        torch.set_num_threads(torch_threads)
    return loop.modules, loop.info
