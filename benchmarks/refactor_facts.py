"""The measurements behind the re-factorization's design choices (docs/strategies.md, docs/benchmarks.md).

    python benchmarks/refactor_facts.py

1. Thin GEMMs of the Gram routes, torch (MKL on x86 wheels) against numpy's BLAS, one thread each.
2. Condition numbers κ of the equilibrated Gram matrices of both factor sides, on the real SD 1.5 fixture
   pairs (skipped when ../shared is absent): which side the fp32 Gram route should whiten.
3. sha256 of a 177 MB file: chunked reads against a read-only mapping.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits


def _median_ms(f, n: int = 200) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def gemms() -> None:
    print("1. thin GEMMs, one thread each: torch vs numpy BLAS (median ms, GFLOP/s)")
    for dtype, shapes in ((torch.float32, [(2048, 64), (1280, 64), (640, 64)]), (torch.float64, [(2048, 128), (1280, 128)])):
        for d, w in shapes:
            b = torch.randn(d, w, dtype=dtype)
            bn = b.numpy()
            flops = 2 * d * w * w
            t_torch = _median_ms(lambda b=b: b.T @ b)
            t_np = _median_ms(lambda bn=bn: bn.T @ bn)
            print(f"   {str(dtype)[6:]:<8} BᵀB {d}×{w}: torch {t_torch:.3f} ms ({flops / t_torch / 1e6:.0f} GFLOP/s), "
                  f"numpy {t_np:.3f} ms ({flops / t_np / 1e6:.0f} GFLOP/s)  → {t_torch / t_np:.2f}×")
        d, w = (2048, 64)
        b, p = torch.randn(d, w, dtype=dtype), torch.randn(w, w, dtype=dtype)
        bn, pn = b.numpy(), p.numpy()
        t_torch, t_np = _median_ms(lambda b=b, p=p: b @ p), _median_ms(lambda bn=bn, pn=pn: bn @ pn)
        print(f"   {str(dtype)[6:]:<8} B·P {d}×{w}·{w}×{w}: torch {t_torch:.3f} ms, numpy {t_np:.3f} ms  → {t_torch / t_np:.2f}×")


def _kappa(g: torch.Tensor) -> float:
    g = g.double()
    d = g.diagonal().rsqrt()
    e = torch.linalg.eigvalsh(g * d[:, None] * d[None, :])
    return float(e[-1] / e[0].clamp_min(1e-300))


def kappas() -> None:
    fixtures = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sd15"
    if not fixtures.is_dir():
        print("2. skipped: ../shared/fixtures/sd15 is absent")
        return
    import lora_merge as lm

    names = ["pokemon_style", "rick_and_morty_style", "sd_lora_2100", "course3_unet_prefixed"]
    ads = {n: lm.load(fixtures / f"{n}.safetensors") for n in names}
    print("2. κ of the equilibrated Gram matrices of the concatenated factors, per fixture pair (median / max)")
    for i, j in ((0, 1), (2, 3), (0, 2)):
        a, b = ads[names[i]], ads[names[j]]
        ks = {"B": [], "A": []}
        for name in a.modules:
            if name not in b.modules:
                continue
            ups, downs = [], []
            for ad in (a, b):
                up, down = ad.modules[name].factors(torch.float32, "cpu")
                ups.append(up.reshape(up.shape[0], -1))
                downs.append(down.reshape(down.shape[0], -1))
            bb, aa = torch.cat(ups, 1), torch.cat(downs, 0)
            ks["B"].append(_kappa(bb.T @ bb))
            ks["A"].append(_kappa(aa @ aa.T))
        print(f"   {names[i]} + {names[j]} ({len(ks['A'])} layers): "
              + ", ".join(f"{side} {statistics.median(v):.3g} / {max(v):.3g}" for side, v in ks.items()))


def hashing() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.bin"
        path.write_bytes(os.urandom(177 << 20))

        def chunked():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            return h.hexdigest()

        def mapped():
            h = hashlib.sha256()
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
            return h.hexdigest()

        def cpu(f):
            ts = []
            for _ in range(5):
                t = time.process_time()
                f()
                ts.append(time.process_time() - t)
            return statistics.median(ts)

        c, m = cpu(chunked), cpu(mapped)
        print(f"3. sha256 of 177 MB, CPU seconds: chunked reads {c:.3f}, read-only mapping {m:.3f} "
              f"({(1 - m / c) * 100:.0f}% less); {177 / 1024 / m:.2f} GB/s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    threadpool_limits(limits=1, user_api="blas")
    which = sys.argv[1:] or ["gemms", "kappas", "hashing"]
    for name in which:
        globals()[name]()
