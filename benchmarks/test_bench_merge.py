"""Merge benchmarks on a synthetic SDXL attention pair: 560 layers, rank 64, fp16.

    python -m pytest benchmarks/test_bench_merge.py -q --benchmark-only -s

Targets (ratios of medians in the same run):
- ``lora_merge.merge`` linear (exact, rank 128 out) ≤ 1.3× the floor "load both with safetensors,
  concatenate, save";
- ``--rank 64`` (re-factorization from the factors: two R×R Gram matrices + a small eigenproblem per
  layer, fp32 when the fp16 output's rounding dominates their error, layers on every CPU) ≤ 2.5× the
  same floor;
- the rank-64 re-factorization ≥ 20× faster than a dense ``torch.linalg.svd`` of each layer's ΔW (what
  kohya's svd_merge_lora.py and PEFT's svd path do) at equal error — measured on one layer of each
  SDXL attention shape (4 layers), because the dense SVD of all 560 layers takes too long to repeat;
- peak memory ≤ 1.5 × (largest input + output), measured in a fresh process as the peak of its
  anonymous memory (``RssAnon``: heap, the buffers we allocate) above the value after imports, sampled
  every millisecond.  The inputs are memory-mapped, copy-on-write, like ``safetensors.safe_open``; the
  pages of them that were read count in RSS but are file-backed page cache that the kernel drops under
  pressure, so they are reported separately (``RssFile``) with the plain RSS high-water mark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lora_merge as lm
from lora_merge import linalg
from lora_merge.engine import REFACTOR_TOL

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from floor import load_concat_save


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Both sides of every ratio run with one torch thread: on a shared, oversubscribed machine two
    OpenMP threads make small LAPACK calls (QR, SVD) up to ~100x slower, which would measure the
    machine's load rather than the algorithm."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _floor(a, b, out):
    """The least any merge tool must do: load both, concatenate the factors (scale folded in), save."""
    load_concat_save(a, b, out)


def _rm(path):
    if os.path.exists(path):
        os.unlink(path)


@pytest.mark.benchmark(group="merge")
def test_floor_concat_save(benchmark, sdxl_merge_pair, tmp_path, record_ratio):
    out = tmp_path / "floor.safetensors"
    benchmark.pedantic(
        _floor, args=(*sdxl_merge_pair, out), setup=lambda: _rm(out), rounds=5, warmup_rounds=1
    )
    record_ratio("merge linear / floor", "baseline", benchmark)
    record_ratio("merge --rank 64 / floor", "baseline", benchmark)


@pytest.mark.benchmark(group="merge")
def test_merge_linear(benchmark, sdxl_merge_pair, tmp_path, record_ratio):
    out = tmp_path / "linear.safetensors"

    def run():
        return lm.merge(list(sdxl_merge_pair), out, dtype="fp16", to="kohya")

    res = benchmark.pedantic(run, setup=lambda: _rm(out), rounds=5, warmup_rounds=1)
    assert len(res.adapter) == 560 and {m.rank for m in res.adapter} == {128}
    record_ratio("merge linear / floor", "ours", benchmark)


@pytest.mark.benchmark(group="merge")
def test_merge_rank64(benchmark, sdxl_merge_pair, tmp_path, record_ratio):
    out = tmp_path / "r64.safetensors"

    def run():
        return lm.merge(list(sdxl_merge_pair), out, dtype="fp16", to="kohya", rank=64)

    res = benchmark.pedantic(run, setup=lambda: _rm(out), rounds=5, warmup_rounds=1)
    assert {m.rank for m in res.adapter} == {64}
    record_ratio("merge --rank 64 / floor", "ours", benchmark)


# ---------------------------------------------------------------- re-factorization vs dense SVD
def _sample_layers(pair, n_per_shape=1):
    """Concatenated fp32 factors of a few layers per distinct SDXL attention shape."""
    a, b = (lm.load(p) for p in pair)
    by_shape: dict[tuple, list] = {}
    for name, m in a.modules.items():
        lst = by_shape.setdefault((m.out_features, m.in_features), [])
        if len(lst) < n_per_shape:
            lst.append(name)
    layers = []
    for names in by_shape.values():
        for n in names:
            ba, aa = a[n].factors()
            bb, ab = b[n].factors()
            layers.append(linalg.concat_factors([ba, bb], [aa, ab], [a[n].scale, b[n].scale]))
    return layers


#: the accuracy `merge --rank 64 --dtype fp16` asks of the re-factorization (the fp32 Gram route)
_FP16_TOL = REFACTOR_TOL[torch.float16]


def _ours(layers, k=64):
    return [linalg.refactor(up, down, k, tol=_FP16_TOL) for up, down in layers]


def _dense(layers, k=64):
    out = []
    for up, down in layers:
        u, s, vh = torch.linalg.svd(up @ down, full_matrices=False)
        out.append((u[:, :k] * s[:k], vh[:k]))
    return out


def _errors(layers, approx):
    return [
        float((up @ down - b @ a).norm() / (up @ down).norm()) for (up, down), (b, a) in zip(layers, approx)
    ]


@pytest.fixture(scope="module")
def sample_layers(sdxl_merge_pair):
    return _sample_layers(sdxl_merge_pair)


@pytest.mark.benchmark(group="refactor-64")
def test_refactor_qr_core_svd(benchmark, sample_layers, record_ratio):
    approx = benchmark.pedantic(_ours, args=(sample_layers,), rounds=5, warmup_rounds=1)
    benchmark.extra_info["rel_error"] = _errors(sample_layers, approx)
    record_ratio("rank-64 refactor: factors / dense SVD (4 layers)", "ours", benchmark)


@pytest.mark.benchmark(group="refactor-64")
def test_refactor_dense_svd(benchmark, sample_layers, record_ratio):
    approx = benchmark.pedantic(_dense, args=(sample_layers,), rounds=1, warmup_rounds=0)
    dense_err = _errors(sample_layers, approx)
    ours_err = _errors(sample_layers, _ours(sample_layers))
    benchmark.extra_info["rel_error"] = dense_err
    for e_ours, e_dense in zip(ours_err, dense_err):  # equal error: both are the Eckart–Young optimum
        assert abs(e_ours - e_dense) <= 1e-4 * max(e_dense, 1e-6) + 1e-6
    record_ratio("rank-64 refactor: factors / dense SVD (4 layers)", "baseline", benchmark)


# ---------------------------------------------------------------- peak memory
_MEM_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import lora_merge as lm, torch
    torch.set_num_threads(1)
    torch.zeros(1)
    def status():
        with open("/proc/self/status") as f:
            d = dict(l.split(":", 1) for l in f if ":" in l)
        return {k: int(d[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    before = status()
    peaks = dict(before)
    done = False
    def sample():
        while not done:
            for k, v in status().items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.001)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    lm.merge(sys.argv[2:4], sys.argv[4], dtype="fp16", to="kohya", **json.loads(sys.argv[5]))
    done = True
    th.join()
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child of a big
    # process (pytest) would report its parent's RSS as its own high-water mark
    hwm = status()["VmHWM"]
    print(json.dumps({"before": before, "peaks": peaks, "hwm": hwm}))
    """
)


def _peak(args):
    r = subprocess.run(
        [sys.executable, "-c", _MEM_SCRIPT, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark(group="merge-memory")
@pytest.mark.parametrize("kw", [{}, {"rank": 64}], ids=["linear", "rank64"])
def test_merge_peak_memory(benchmark, sdxl_merge_pair, tmp_path, kw):
    out = tmp_path / "mem.safetensors"
    mem = benchmark.pedantic(_peak, args=(["merge", *sdxl_merge_pair, out, json.dumps(kw)],), rounds=1)
    largest_in = max(os.path.getsize(p) for p in sdxl_merge_pair)
    out_size = os.path.getsize(out)
    used = mem["hwm"] - mem["before"]["VmRSS"]  # kernel high-water mark of RSS (incl. mapped input pages)
    anon = mem["peaks"]["RssAnon"] - mem["before"]["RssAnon"]  # sampled: heap only (no mmapped input pages)
    mapped = mem["peaks"]["RssFile"] - mem["before"]["RssFile"]  # sampled: pages of the mapped inputs
    ratio = anon / (largest_in + out_size)
    benchmark.extra_info.update(
        anon_peak_mb=anon / 2**20,
        peak_over_imports_mb=used / 2**20,
        largest_input_mb=largest_in / 2**20,
        output_mb=out_size / 2**20,
        mapped_input_pages_mb=mapped / 2**20,
        ratio=ratio,
        rss_ratio=used / (largest_in + out_size),
    )
    print(
        f"\npeak memory {kw or 'linear'}: {anon / 2**20:.0f} MB anonymous above imports; largest input "
        f"{largest_in / 2**20:.0f} MB + output {out_size / 2**20:.0f} MB -> {ratio:.2f}x (target <= 1.5x); "
        f"RSS high-water {used / 2**20:.0f} MB ({used / (largest_in + out_size):.2f}x) incl. "
        f"{mapped / 2**20:.0f} MB of mapped input pages"
    )


def _interleaved(runs: dict, rounds: int, before_each=lambda: None) -> None:
    """Time every variant once per round, interleaved (so they share the machine's load), and print each
    median against the "floor" entry's median."""
    import statistics
    import time

    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            before_each()
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["floor"])
    width = max(map(len, runs)) + 2
    print(f"{os.cpu_count()} CPUs; medians of {rounds} rounds")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:<{width}} {m * 1e3:8.0f} ms  {m / base:5.2f}x floor  (range {min(v) / base:.2f}-{max(v) / base:.2f}x)")


def _breakdown(a, b, d, kw: dict, rounds: int) -> None:
    """Where a merge's time goes, in one run: the floor; the merge as shipped (layers on every CPU); on one
    thread; without the sha256 of the inputs; and, for ``--rank``, the fp64 Gram route of the concatenated
    factors (what fp32 outputs take; the previous round's route, now with numpy's BLAS) and QR + core SVD,
    both on one thread."""

    import lora_merge.engine as eng

    torch.set_num_threads(1)
    plan32, gram64, lin, sha = linalg._gram32_plan, linalg._core_svd_gram, eng._linear_fast_path, eng.input_sha256
    out, fl = os.path.join(d, "bd.safetensors"), os.path.join(d, "bd_floor.safetensors")

    def merge(threads=None, nohash=False, fp64=False, qr=False):
        if fp64 or qr:
            linalg._gram32_plan = lambda *x: None
            eng._linear_fast_path = lambda *x: None
        if qr:
            linalg._core_svd_gram = lambda *x: None
        eng.input_sha256 = (lambda p: None) if nohash else sha
        try:
            lm.merge([a, b], out, dtype="fp16", to="kohya", threads=threads, **kw)
        finally:
            linalg._gram32_plan, linalg._core_svd_gram = plan32, gram64
            eng._linear_fast_path, eng.input_sha256 = lin, sha

    runs = {"floor": lambda: _floor(a, b, fl), "merge (as shipped)": merge,
            "merge --threads 1": lambda: merge(threads=1),
            "merge, no input sha256": lambda: merge(nohash=True)}
    if kw.get("rank"):
        runs["fp64 Gram route, 1 thread"] = lambda: merge(threads=1, fp64=True)
        runs["QR + core SVD, 1 thread"] = lambda: merge(threads=1, qr=True)
    _interleaved(runs, rounds, before_each=lambda: (_rm(out), _rm(fl)))


def _bound(a, b, d, rounds: int) -> None:
    """What ``--rank 64`` cannot go below on this machine: the floor, then only the arithmetic of the 560
    re-factorizations (inputs already in fp32 memory; no reading, hashing or writing), serial and on
    every CPU, and its two irreducible parts: the GEMMs (Gram blocks and new factors, numpy BLAS) and
    the 560 R×R eigensolvers."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")
    ta, tb = lm.load(a), lm.load(b)
    layers = []
    for name, ma in ta.modules.items():
        mb = tb.modules[name]
        layers.append(([ma.up.load().float(), mb.up.load().float()], [ma.down.load().float(), mb.down.load().float()],
                       [ma.scale, mb.scale]))
    tol = REFACTOR_TOL[torch.float16]

    def one(x):
        return linalg.refactor_sum(*x, 64, tol=tol)

    def serial():
        for x in layers:
            one(x)

    def parallel():
        with ThreadPoolExecutor(os.cpu_count()) as ex:
            list(ex.map(one, layers))

    def gemms():
        for ups, downs, _ in layers:
            p = torch.randn(64, 64)
            for i in range(2):
                for j in range(i, 2):
                    linalg._mm(ups[i].T, ups[j]), linalg._mm(downs[i], downs[j].T)
                linalg._mm(ups[i], p), linalg._mm(p, downs[i])

    h = torch.randn(128, 128)
    h = h @ h.T

    def eighs():
        for _ in layers:
            torch.linalg.eigh(h)

    fl = os.path.join(d, "bound_floor.safetensors")

    def floor():
        _rm(fl)
        _floor(a, b, fl)

    runs = {"floor": floor, "arithmetic only, 1 thread": serial, f"arithmetic only, {os.cpu_count()} threads": parallel,
            "... its GEMMs (numpy BLAS, 1 thread)": gemms, "... its 560 eigensolvers (1 thread)": eighs}
    _interleaved(runs, rounds)


if __name__ == "__main__":
    # python benchmarks/test_bench_merge.py [JSON-KWARGS]            peak memory, outside pytest
    # python benchmarks/test_bench_merge.py breakdown [JSON-KWARGS] [ROUNDS]   time breakdown, one process
    # python benchmarks/test_bench_merge.py bound [ROUNDS]    --rank 64's arithmetic alone against the floor
    import tempfile
    from pathlib import Path

    from conftest import sdxl_attention_projections, write_kohya_lora

    with tempfile.TemporaryDirectory() as d:
        if len(sys.argv) > 1 and sys.argv[1] == "bound":
            layers = sdxl_attention_projections()
            a = write_kohya_lora(Path(d) / "a.safetensors", layers, 64, 32.0, seed=1)
            b = write_kohya_lora(Path(d) / "b.safetensors", layers, 64, 64.0, seed=2)
            _bound(a, b, d, int(sys.argv[2]) if len(sys.argv) > 2 else 3)
            sys.exit(0)
        if len(sys.argv) > 1 and sys.argv[1] == "breakdown":
            layers = sdxl_attention_projections()
            a = write_kohya_lora(Path(d) / "a.safetensors", layers, 64, 32.0, seed=1)
            b = write_kohya_lora(Path(d) / "b.safetensors", layers, 64, 64.0, seed=2)
            kwargs = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
            _breakdown(a, b, d, kwargs, int(sys.argv[3]) if len(sys.argv) > 3 else 3)
            sys.exit(0)
        layers = sdxl_attention_projections()
        a = write_kohya_lora(Path(d) / "a.safetensors", layers, 64, 32.0, seed=1)
        b = write_kohya_lora(Path(d) / "b.safetensors", layers, 64, 64.0, seed=2)
        out = Path(d) / "out.safetensors"
        m = _peak(["merge", a, b, out, sys.argv[1] if len(sys.argv) > 1 else "{}"])
        used = m["hwm"] - m["before"]["VmRSS"]
        anon = m["peaks"]["RssAnon"] - m["before"]["RssAnon"]
        base = max(os.path.getsize(a), os.path.getsize(b)) + os.path.getsize(out)
        mapped = m["peaks"]["RssFile"] - m["before"]["RssFile"]
        print(
            f"peak anonymous {anon / 2**20:.0f} MB = {anon / base:.2f}x; RSS high-water {used / 2**20:.0f} MB "
            f"= {used / base:.2f}x incl. {mapped / 2**20:.0f} MB mapped input pages "
            f"(largest input {max(os.path.getsize(a), os.path.getsize(b)) / 2**20:.0f} MB + output "
            f"{os.path.getsize(out) / 2**20:.0f} MB)"
        )
