"""The merge engine: line up the modules of N adapters and hand each layer to a strategy.

The engine owns the strength semantics (``ΔW = Σ w_i · s_i · B_i A_i``, each scale applied once), the
plan (union of modules, shape checks), per-input and per-pattern weights, re-factorization of dense or
over-rank results, the output metadata and the write.  Layers are processed one at a time: each
input's factors for a layer are loaded, merged and dropped, so peak memory stays near one layer plus
the output.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import threading
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import arch as arch_mod
from . import linalg
from .adapter import Adapter, LoraModule, TensorRef
from .errors import MergeError, MissingModuleWarning, OutputExistsError, UsageError
from .patterns import compile_pattern
from .strategies import LayerContext, LayerInput, LayerResult, MergeStrategy, get_strategy

__all__ = ["MergeResult", "input_sha256", "merge", "parse_dtype", "parse_layer_weight"]

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "f32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class MergeResult:
    adapter: Adapter
    report: dict[str, Any]
    output: Path | None = None
    warnings: list[str] = field(default_factory=list)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return _DTYPES[key]


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def parse_layer_weight(spec: str) -> tuple[str, float | list[float]]:
    """``'PATTERN=W'`` or ``'PATTERN=W1,W2,…'`` (one weight per input) → ``(pattern, value)``."""
    pattern, sep, value = str(spec).rpartition("=")
    if not sep or not pattern.strip() or not value.strip():
        raise UsageError(f"--weight {spec!r}: expected PATTERN=W or PATTERN=W1,W2,...")
    try:
        vals = [float(v) for v in value.split(",")]
    except ValueError:
        raise UsageError(f"--weight {spec!r}: {value!r} is not a number or a comma-separated list") from None
    return pattern.strip(), vals[0] if len(vals) == 1 else vals


def _hash_file(path: Path) -> str:
    """sha256 of a file, hashed from a read-only mapping (no copies; 13% less CPU than chunked reads in benchmarks/refactor_facts.py)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            h.update(m)
    return h.hexdigest()


def input_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of an input file; for a PEFT folder, of its ``adapter_model.safetensors`` (or ``.bin``)."""
    p = Path(path)
    if p.is_dir():
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if (p / name).is_file():
                return _hash_file(p / name)
        return None
    return _hash_file(p) if p.is_file() else None


# ---------------------------------------------------------------- inputs and plan
def _load_inputs(inputs: Sequence[str | os.PathLike | Adapter]) -> list[Adapter]:
    adapters = []
    for item in inputs:
        if isinstance(item, Adapter):
            adapters.append(item)
        else:
            from . import load  # H1's reader; imported lazily so the engine imports without it

            adapters.append(load(item))
    return adapters


def _input_paths(inputs: Sequence[str | os.PathLike | Adapter], adapters: list[Adapter]) -> list[Path | None]:
    paths = []
    for item, ad in zip(inputs, adapters):
        p = ad.source if isinstance(item, Adapter) else Path(item)
        paths.append(Path(p) if p is not None else None)
    return paths


def _check_output(output: Path, input_paths: list[Path | None], force: bool) -> None:
    out = output.resolve()
    for p in input_paths:
        if p is None:
            continue
        src = p.resolve()
        if (
            out == src
            or (src.is_dir() and src in out.parents)
            or (out.exists() and out.is_dir() and out in src.parents)
        ):
            raise OutputExistsError(
                "refusing to write over an input of the merge (even with --force)", output
            )
    if output.exists() and not force:
        raise OutputExistsError("output exists; pass --force to overwrite it", output)


def _resolve_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise UsageError(f"{len(w)} weight(s) given for {n} input(s)")
    if not all(math.isfinite(x) for x in w):
        raise UsageError(f"weights must be finite numbers, got {w}")
    return w


def _resolve_layer_weights(layer_weights, n: int) -> list[tuple[str, list[float]]]:
    out = []
    for item in layer_weights or ():
        pattern, value = parse_layer_weight(item) if isinstance(item, str) else item
        compile_pattern(pattern)
        vals = [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(vals) != n:
            raise UsageError(f"--weight {pattern!r}: {len(vals)} value(s) for {n} input(s)")
        out.append((pattern, vals))
    return out


def _plan(adapters: list[Adapter], names: list[str]) -> list[str]:
    """Union of module names (first-seen order); raise on shape conflicts; warn about missing modules."""
    order: dict[str, int] = {}
    for ad in adapters:
        for n in ad.modules:
            order.setdefault(n, len(order))
    plan = list(order)
    for name in plan:
        first = None
        for i, ad in enumerate(adapters):
            m = ad.modules.get(name)
            if m is None:
                continue
            if first is None:
                first = (i, m)
            elif m.weight_shape != first[1].weight_shape:
                j, fm = first
                raise MergeError(
                    f"module {name} has weight shape {_shape(fm.weight_shape)} in input {j + 1} ({names[j]}) "
                    f"but {_shape(m.weight_shape)} in input {i + 1} ({names[i]}); "
                    "are these LoRAs for different base models (e.g. SD 1.x and SDXL)?"
                )
    for i, ad in enumerate(adapters):
        missing = [n for n in plan if n not in ad.modules]
        if missing and len(adapters) > 1:
            warnings.warn(
                MissingModuleWarning(
                    f"{len(missing)} of {len(plan)} merged module(s) are absent from input {i + 1} "
                    f"({names[i]}),"
                    f" e.g. {missing[0]}; treated as zero updates"
                ),
                stacklevel=3,
            )
    return plan


def _shape(s) -> str:
    return "×".join(str(int(x)) for x in s)


def _merge_extras(adapters: list[Adapter], names: list[str], keep_from: int | None) -> dict[str, TensorRef]:
    """PEFT ``modules_to_save`` tensors: identical everywhere → kept; different → error unless chosen."""
    if keep_from is not None and not 0 <= keep_from < len(adapters):
        raise UsageError(f"--keep-heads-from {keep_from + 1}: there are only {len(adapters)} inputs")
    keys: dict[str, None] = {}
    for ad in adapters:
        keys.update(dict.fromkeys(ad.extra_tensors))
    out: dict[str, TensorRef] = {}
    conflicts = []
    for key in keys:
        have = [(i, ad.extra_tensors[key]) for i, ad in enumerate(adapters) if key in ad.extra_tensors]
        i0, ref0 = have[0]
        t0 = ref0.load()
        differs = None
        for i, ref in have[1:]:
            if ref.shape != ref0.shape or not torch.equal(ref.load().to(t0.dtype), t0):
                differs = (i, ref)
                break
        if differs is None:
            out[key] = TensorRef.from_tensor(t0, key)
        elif keep_from is not None:
            if key in adapters[keep_from].extra_tensors:
                out[key] = TensorRef.from_tensor(adapters[keep_from].extra_tensors[key].load(), key)
        else:
            i, ref = differs
            what = (
                f"{_shape(ref0.shape)} in input {i0 + 1} vs {_shape(ref.shape)} in input {i + 1}"
                if ref.shape != ref0.shape
                else f"same shape {_shape(ref.shape)}, different values in inputs {i0 + 1} and {i + 1}"
            )
            conflicts.append(f"{key} ({what})")
    if conflicts:
        listed = ", ".join(f"{i + 1}={nm}" for i, nm in enumerate(names))
        raise MergeError(
            "the inputs' non-LoRA tensors (PEFT modules_to_save, e.g. classifier heads) conflict "
            f"(inputs {listed}): "
            + "; ".join(conflicts[:3])
            + (f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
            + "; pick one input's with --keep-heads-from N (keep_extra_from=N-1)"
        )
    return out


# ---------------------------------------------------------------- per layer
def _layer_inputs(adapters, name, shape_mod: LoraModule, coeffs: list[float], device) -> list[LayerInput]:
    res = []
    d_out, d_in = shape_mod.out_features, shape_mod.in_features
    for ad, w in zip(adapters, coeffs):
        m = ad.modules.get(name)
        if m is None:
            z = torch.zeros
            res.append(
                LayerInput(z(d_out, 0, device=device), z(0, d_in, device=device), 0.0, w, present=False)
            )
            continue
        b, a = m.factors(torch.float32, device)
        res.append(LayerInput(up=b, down=a, scale=m.scale, weight=w))
    return res


def _finish_layer(result: LayerResult, rank: int | None, tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Factors of the strategy's answer at the requested rank; returns (up, down, refactored)."""
    if result.dense is not None:
        up, down = linalg.refactor_dense(result.dense.float(), rank)
        return up, down, True
    up, down = result.up.float(), result.down.float()
    if rank is not None and up.shape[1] > rank:
        up, down = linalg.refactor(up, down, rank, tol=tol)
        return up, down, True
    return up, down, False


#: relative accuracy a re-factorization needs for an output dtype: a quarter of its unit roundoff (the
#: rounding of the stored factors is then the larger error); fp32 and fp64 outputs get fp64 Gram matrices
_REFACTOR_TOL = {torch.float16: 2.0**-11 / 4, torch.bfloat16: 2.0**-8 / 4}


def _worker_count(threads: int | None, dev: torch.device) -> int:
    if dev.type != "cpu":
        return 1
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            threads = os.cpu_count() or 1
    return max(1, int(threads))


def _to_module(name: str, shape_mod: LoraModule, up, down, dtype: torch.dtype) -> LoraModule:
    k = int(up.shape[1])
    if k == 0:  # a zero update; loaders dislike rank 0, so write rank 1 with zero factors
        up, down, k = up.new_zeros(up.shape[0], 1), down.new_zeros(1, down.shape[1]), 1
    ws = shape_mod.weight_shape
    if len(ws) == 4:
        down = down.reshape(k, *ws[1:])
        up = up.reshape(ws[0], k, 1, 1)
    down = down.detach().to("cpu", dtype).contiguous()
    up = up.detach().to("cpu", dtype).contiguous()
    return LoraModule.from_tensors(name, down, up, alpha=float(k))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class _ExactConcat:
    """The built-in ``linear`` strategy without re-factorization, written straight into the output dtype.

    Bit-identical to the general path (fp32 factors → ``concat`` → cast): B is copied (fp16/bf16 → fp32
    is exact, so one cast to the output dtype rounds once, as before); each ``A_i`` is widened into a
    reused fp32 scratch buffer, multiplied by its coefficient in fp32 (the scale applied once, the same
    ``fp32 × scalar`` operation) and then cast.  No per-layer fp32 buffers, no second copy.
    """

    def __init__(self, adapters: list[Adapter], out_dtype: torch.dtype):
        self.adapters = adapters
        self.out_dtype = out_dtype
        self._local = threading.local()  # one scratch buffer per worker thread

    def _buffer(self, n: int) -> torch.Tensor:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None or scratch.numel() < n:
            scratch = self._local.scratch = torch.empty(n, dtype=torch.float32)
        return scratch[:n]

    def parts(self, name: str, coeffs: list[float]) -> list[tuple[LoraModule, float]] | None:
        """The contributing ``(module, coefficient)`` pairs of a layer, or None when one has an odd dtype."""
        parts = []
        for ad, w in zip(self.adapters, coeffs):
            m = ad.modules.get(name)
            if m is None or m.rank == 0:
                continue
            coeff = w * m.scale  # LayerInput.coeff
            if coeff == 0.0:
                continue
            if m.down.dtype not in _FLOATS or m.up.dtype not in _FLOATS:
                return None
            parts.append((m, coeff))
        return parts

    def applies(self, name: str, coeffs: list[float]) -> bool:
        """False when this layer needs the general path (nothing to write, an odd dtype)."""
        return self.out_dtype in _FLOATS and bool(self.parts(name, coeffs))

    def layer(self, name: str, shape_mod: LoraModule, coeffs: list[float]) -> tuple[LoraModule, bool]:
        """``(module, refactored)`` of a layer for which :meth:`applies` is true."""
        parts = self.parts(name, coeffs)
        d_out, d_in = shape_mod.out_features, shape_mod.in_features
        total = sum(m.rank for m, _ in parts)
        up = torch.empty(d_out, total, dtype=self.out_dtype)
        down = torch.empty(total, d_in, dtype=self.out_dtype)
        o = 0
        for m, coeff in parts:
            r = m.rank
            b = m.up.load().reshape(d_out, r)
            a = m.down.load().reshape(r, d_in)
            if b.dtype == self.out_dtype or b.dtype == torch.float32 or self.out_dtype == torch.float32:
                up[:, o : o + r].copy_(b)
            else:  # e.g. bf16 → fp16: widen first, so the one rounding is the fp32 → output cast
                up[:, o : o + r].copy_(b.float())
            if self.out_dtype == torch.float32:
                dst = down[o : o + r]
                dst.copy_(a)
                dst.mul_(coeff)
            else:
                tmp = self._buffer(r * d_in).view(r, d_in)
                tmp.copy_(a)
                tmp.mul_(coeff)
                down[o : o + r].copy_(tmp)
            o += r
        ws = shape_mod.weight_shape
        if len(ws) == 4:
            down = down.reshape(total, *ws[1:])
            up = up.reshape(ws[0], total, 1, 1)
        return LoraModule.from_tensors(name, down, up, alpha=float(total)), False


class _LinearRefactor(_ExactConcat):
    """The built-in ``linear`` strategy with ``--rank K``: ``linalg.refactor_sum`` straight from each input's
    factors (no concatenated or scaled fp32 copies); layers whose exact rank is at most K are
    concatenated exactly, as the general path does."""

    def __init__(self, adapters: list[Adapter], out_dtype: torch.dtype, rank: int, tol: float):
        super().__init__(adapters, out_dtype)
        self.rank, self.tol = int(rank), tol

    def layer(self, name: str, shape_mod: LoraModule, coeffs: list[float]) -> tuple[LoraModule, bool]:
        parts = self.parts(name, coeffs)
        if sum(m.rank for m, _ in parts) <= self.rank:
            return super().layer(name, shape_mod, coeffs)
        d_out, d_in = shape_mod.out_features, shape_mod.in_features
        ups = [m.up.load().reshape(d_out, m.rank) for m, _ in parts]
        downs = [m.down.load().reshape(m.rank, d_in) for m, _ in parts]
        up, down = linalg.refactor_sum(ups, downs, [c for _, c in parts], self.rank, tol=self.tol)
        return _to_module(name, shape_mod, up, down, self.out_dtype), True


def _linear_fast_path(strat: MergeStrategy, adapters: list[Adapter], rank, dev: torch.device,
                      want_retention: bool, out_dtype: torch.dtype, tol: float) -> _ExactConcat | None:
    """The built-in ``linear`` strategy's direct path (CPU, no retention report), or None."""
    from .strategies.linear import Linear

    if type(strat) is not Linear or dev.type != "cpu" or want_retention:
        return None
    return _ExactConcat(adapters, out_dtype) if rank is None else _LinearRefactor(adapters, out_dtype, rank, tol)


def _retention(up, down, inputs: list[LayerInput], name: str) -> dict:
    """How much of input 1 (content) and input 2 (style) the merged layer keeps (fidelity.py)."""
    from .fidelity import retention

    return retention(up, down, inputs[0], inputs[1], input_model="subspace", module=name)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(
        TextColumn("merging"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        transient=True,
    )
    return prog


# ---------------------------------------------------------------- public API
def merge(
    inputs: Sequence[str | os.PathLike | Adapter],
    output: str | os.PathLike | None = None,
    *,
    strategy: str | MergeStrategy = "linear",
    weights: Sequence[float] | None = None,
    layer_weights: Sequence[tuple[str, float | Sequence[float]] | str] = (),
    params: dict[str, Any] | None = None,
    rank: int | None = None,
    to: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    keep_extra_from: int | None = None,
    progress: bool = False,
    report_path: str | os.PathLike | None = None,
    arch: str | None = None,
    threads: int | None = None,
) -> MergeResult:
    """Merge LoRA adapters (paths or in-memory :class:`Adapter`) with a strategy.

    ``weights`` are per-input inference strengths; ``layer_weights`` are ``(pattern, w)`` or
    ``(pattern, [w_1, …, w_n])`` pairs (or ``'PATTERN=W'`` strings) that multiply the weights of the
    layers the pattern matches (see :mod:`lora_merge.patterns`).  ``rank=None`` keeps the result's exact
    rank; ``rank=K`` re-factors every layer to at most ``K`` from its factors.  Tensors are merged in
    fp32 on ``device`` and stored as ``dtype`` (fp32 when None).  ``keep_extra_from`` is a 0-based input
    index.  Nothing is written when ``output`` is None.  ``threads`` layers are finished (re-factored,
    cast) side by side on the CPU, each with one torch thread (default: every CPU this process may
    use); the result is the same for any value.  While the layers run, torch's intra-op thread count
    and numpy's BLAS threads are set to 1 process-wide (restored afterwards).
    """
    if not inputs:
        raise UsageError("no inputs to merge")
    out_dtype = parse_dtype(dtype) or torch.float32
    if threads is not None and (int(threads) != threads or threads < 1):
        raise UsageError(f"--threads must be a positive integer, got {threads!r}")
    if rank is not None and (int(rank) != rank or rank < 1):
        raise UsageError(f"--rank must be a positive integer, got {rank!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available")
    if isinstance(strategy, MergeStrategy):
        if params:
            raise UsageError("pass strategy parameters to the strategy object, not params=")
        strat = strategy
    else:
        strat = get_strategy(str(strategy))(**(params or {}))
    n = len(inputs)
    if n < strat.min_inputs or (strat.max_inputs is not None and n > strat.max_inputs):
        want = f"{strat.min_inputs}" + ("+" if strat.max_inputs is None else f"–{strat.max_inputs}")
        if strat.max_inputs == strat.min_inputs:
            want = str(strat.min_inputs)
        raise UsageError(f"strategy {strat.name!r} takes {want} input(s), got {n}")
    w = _resolve_weights(weights, n)
    lw = _resolve_layer_weights(layer_weights, n)

    # the output checks come first: fail before any work
    provisional_paths = [None if isinstance(x, Adapter) else Path(x) for x in inputs]
    out_path = Path(output) if output is not None else None
    if out_path is not None:
        _check_output(out_path, provisional_paths, force)

    adapters = _load_inputs(inputs)
    paths = _input_paths(inputs, adapters)
    if out_path is not None:
        _check_output(out_path, paths, force)
        if hasattr(strat, "mask_tensors") and mask_sidecar_path(out_path).exists() and not force:
            raise OutputExistsError(
                "mask sidecar exists (use --force to overwrite)", mask_sidecar_path(out_path)
            )
    names = [os.fspath(p) if p is not None else ad.display_name for p, ad in zip(paths, adapters)]
    # hash the input files on other threads while the layers merge (hashlib releases the GIL); one
    # thread per file: sha256 (~1.4 GB/s per core here) is the longest single piece of a linear merge
    hasher = ThreadPoolExecutor(max_workers=max(1, min(len(paths), _worker_count(None, torch.device("cpu")))))
    hashes = [hasher.submit(input_sha256, p) if p is not None else None for p in paths]
    try:
        return _merge_planned(
            strat,
            adapters,
            paths,
            names,
            hashes,
            w,
            lw,
            rank,
            to,
            out_dtype,
            dev,
            seed,
            force,
            keep_extra_from,
            progress,
            report_path,
            arch,
            out_path,
            threads,
        )
    finally:
        hasher.shutdown(wait=True, cancel_futures=True)


def _merge_planned(
    strat,
    adapters,
    paths,
    names,
    hashes,
    w,
    lw,
    rank,
    to,
    out_dtype,
    dev,
    seed,
    force,
    keep_extra_from,
    progress,
    report_path,
    arch,
    out_path,
    threads=None,
) -> MergeResult:
    n = len(adapters)
    plan = _plan(adapters, names)
    if not plan:
        raise MergeError("the inputs contain no LoRA modules to merge")
    extras = _merge_extras(adapters, names, keep_extra_from)
    the_arch = arch or arch_mod.guess_arch(adapters[0])

    recipe = {
        "inputs": [{"path": nm, "sha256": None, "dialect": ad.dialect} for nm, ad in zip(names, adapters)],
        "strategy": strat.name,
        "params": dict(strat.config),
        "weights": w,
        "layer_weights": [[p, v] for p, v in lw],
        "rank": rank,
        "seed": int(seed),
        "dtype": _dtype_name(out_dtype),
        "to": to or adapters[0].dialect,
        "arch": the_arch,
        "keep_heads_from": None if keep_extra_from is None else keep_extra_from + 1,
        "version": _version(),
    }
    strat.prepare(
        adapters,
        {
            "arch": the_arch,
            "seed": int(seed),
            "device": dev,
            "weights": w,
            "layer_weights": lw,
            "rank": rank,
            "names": names,
            "plan": plan,
        },
    )
    want_retention = report_path is not None and n == 2
    merged = Adapter(dialect=adapters[0].dialect, dialect_variant=None, config=_out_config(adapters[0]))
    layer_info: dict[str, dict] = {}
    tol = _REFACTOR_TOL.get(out_dtype, 0.0)
    fast = _linear_fast_path(strat, adapters, rank, dev, want_retention, out_dtype, tol)
    workers = _worker_count(threads, dev)

    def finish(name, shape_mod, layer_in, result, coeffs):
        """Re-factor and cast one layer (pure tensor work: runs on a worker thread)."""
        up, down, refactored = _finish_layer(result, rank, tol)
        info = {"rank": int(up.shape[1]), "weights": coeffs, **result.info}
        if refactored:
            info["refactored"] = True
        if want_retention:
            info["retention"] = _retention(up, down, layer_in, name)
        return info, _to_module(name, shape_mod, up, down, out_dtype)

    def finish_fast(name, shape_mod, coeffs):
        mod, refactored = fast.layer(name, shape_mod, coeffs)
        return {"rank": mod.rank, "weights": coeffs, **({"refactored": True} if refactored else {})}, mod

    prog = _progress(progress, len(plan))
    task = prog.add_task("", total=len(plan)) if prog else None
    pending: deque = deque()  # (name, future) in plan order; at most 2 per worker in flight

    def collect(name, fut):
        info, mod = fut.result()
        layer_info[name] = info
        merged.modules[name] = mod
        if prog:
            prog.update(task, advance=1, description=name)

    # every layer's tensor work runs with one torch thread and one numpy BLAS thread, so the result does
    # not depend on `workers` (BLAS reductions can round differently with more threads); the layers run
    # side by side instead
    from threadpoolctl import threadpool_limits

    torch_threads = torch.get_num_threads()
    blas_limit = threadpool_limits(limits=1, user_api="blas")  # before torch's: restoring it resets OpenMP too
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    if prog:
        prog.start()
    try:
        for idx, name in enumerate(plan):
            shape_mod = next(ad.modules[name] for ad in adapters if name in ad.modules)
            coeffs = list(w)
            for pattern, vals in lw:
                if compile_pattern(pattern).search(name):
                    coeffs = [c * v for c, v in zip(coeffs, vals)]
            ctx = LayerContext(
                name=name,
                index=idx,
                block=arch_mod.sub_block_of(name),
                resolution=arch_mod.resolution_of(name, the_arch),
                arch=the_arch,
                kind=shape_mod.kind,
                weight_shape=shape_mod.weight_shape,
                seed=int(seed),
                device=dev,
                dtype=torch.float32,
                extra={"rank": rank, "input_names": names},
            )
            if fast is not None and fast.applies(name, coeffs):
                job = (finish_fast, name, shape_mod, coeffs)
                heavy = isinstance(fast, _LinearRefactor)  # a re-factorization; an exact concat is a plain copy
            else:
                layer_in = _layer_inputs(adapters, name, shape_mod, coeffs, dev)
                result = strat.merge_layer(layer_in, ctx)
                if not isinstance(result, LayerResult):
                    raise TypeError(f"strategy {strat.name!r} returned {type(result).__name__}, not LayerResult")
                job = (finish, name, shape_mod, layer_in, result, coeffs)
                heavy = rank is not None or result.dense is not None or want_retention
                del layer_in, result
            if pool is None or not heavy:  # a cast or a copy is not worth a hand-off
                while pending:  # keep plan order
                    collect(*pending.popleft())
                info, mod = job[0](*job[1:])
                layer_info[name] = info
                merged.modules[name] = mod
                if prog:
                    prog.update(task, advance=1, description=name)
            else:
                pending.append((name, pool.submit(*job)))
                # insert in plan order; bound the layers in flight so memory stays near a few layers
                while pending and (len(pending) > 2 * workers or pending[0][1].done()):
                    collect(*pending.popleft())
            del job
        while pending:
            collect(*pending.popleft())
    finally:
        if pool is not None:
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True)
        blas_limit.restore_original_limits()
        torch.set_num_threads(torch_threads)
        if prog:
            prog.stop()
    merged.extra_tensors = extras
    for entry, fut in zip(recipe["inputs"], hashes):
        entry["sha256"] = fut.result() if fut is not None else None
    merged.metadata = _metadata(merged, recipe, names)
    report = {"recipe": recipe, "layers": layer_info, "strategy": strat.report()}
    written = None
    if out_path is not None:
        from . import save  # H1's writer (atomic temp file + rename)

        written = save(merged, out_path, to=to, dtype=out_dtype, force=force)
        merged.source = Path(written)
        _write_mask_sidecar(strat, Path(written), recipe)
    if report_path is not None:
        _write_json(Path(report_path), report)
    return MergeResult(adapter=merged, report=report, output=Path(written) if written is not None else None)


def _version() -> str:
    from . import __version__

    return __version__


def _out_config(first: Adapter) -> dict | None:
    """PEFT config of the output: the first input's, with ranks re-derived by the writer."""
    return dict(first.config) if first.config else None


def _metadata(merged: Adapter, recipe: dict, names: list[str]) -> dict[str, str]:
    ranks = {m.rank for m in merged}
    # kohya writes "Dynamic" when ranks differ between modules (resize_lora.py --dynamic_method)
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    return {
        "lora_merge.recipe": json.dumps(recipe, sort_keys=False),
        "ss_network_dim": dim,
        "ss_network_alpha": dim,  # alpha = rank per module (scale 1): the strength lives in the factors
        "modelspec.merged_from": ", ".join(Path(nm).name for nm in names),
    }


def mask_sidecar_path(output: str | os.PathLike) -> Path:
    """Where a mask strategy's masks go: ``<output>.masks.safetensors`` next to the output (file or folder)."""
    out = Path(output)
    return out.with_name(out.name + ".masks.safetensors")


def _write_mask_sidecar(strat: MergeStrategy, written: Path, recipe: dict) -> None:
    """Additive hook: a strategy with ``mask_tensors() -> {key: tensor}`` (ziplora, duolora) gets its masks
    saved next to the output, so the merge can be inspected or re-applied later."""
    get = getattr(strat, "mask_tensors", None)
    tensors = get() if callable(get) else None
    if not tensors:
        return
    from safetensors.torch import save_file

    path = mask_sidecar_path(written)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    md = {"lora_merge.recipe": json.dumps(recipe), "lora_merge.masks_of": written.name}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(tmp), metadata=md)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
