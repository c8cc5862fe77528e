"""Merge speed on a synthetic full-size FLUX.1 pair, in one run:

    python benchmarks/flux_pair.py [--rounds 3] [--rank 32] [--keep DIR]

Two kohya-dialect FLUX.1 LoRAs (every attention and MLP module of the 19 double-stream and 38 single-stream
blocks of ``FluxTransformer2DModel``'s default config, built on the meta device: fused img/txt qkv,
attention proj, both MLP layers, single-block linear1 and linear2 — 228 modules), rank 32, bf16, about
225 MB each.  Timed, median of ``--rounds`` (one warm-up round first):

* **floor**: load both with ``safetensors``, concatenate each module's factors (scale folded in), save —
  the least any merge tool must do;
* ``lora-merge`` **linear** (exact: rank 64 out, kohya, bf16), through :func:`lora_merge.merge`;
* **--rank 32** (re-factor every merged layer to rank 32 from its factors);
* with ``--lokr``: converting a full-size LoKr file of the same modules (``lokr_w1`` 4×4, ``lokr_w2`` of
  rank 16) to a rank-32 LoRA, timed, with its relative ΔW error.

The same targets as the SDXL benchmark (``benchmarks/test_bench_merge.py``): linear ≤ 1.3× the floor,
``--rank`` ≤ 2.5× the floor.  Prints one line per variant and the ratios; ``--json`` for machines.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import load_concat_save

#: fused (kohya / BFL) module suffix → (out, in) in units of the hidden size
DOUBLE = {"img_attn_qkv": (3, 1), "img_attn_proj": (1, 1), "img_mlp_0": (4, 1), "img_mlp_2": (1, 4),
          "txt_attn_qkv": (3, 1), "txt_attn_proj": (1, 1), "txt_mlp_0": (4, 1), "txt_mlp_2": (1, 4)}
SINGLE = {"linear1": (7, 1), "linear2": (1, 5)}


def flux_layout() -> dict[str, tuple[int, int]]:
    """kohya name → (d_out, d_in) for every attention and MLP module, from the diffusers model's config."""
    from lora_merge.formats import dit_arch

    cfg = dit_arch.meta_model("flux").config
    h = cfg.num_attention_heads * cfg.attention_head_dim
    out = {}
    for i in range(cfg.num_layers):
        for s, (o, n) in DOUBLE.items():
            out[f"lora_unet_double_blocks_{i}_{s}"] = (o * h, n * h)
    for i in range(cfg.num_single_layers):
        for s, (o, n) in SINGLE.items():
            out[f"lora_unet_single_blocks_{i}_{s}"] = (o * h, n * h)
    return out


def write_pair(folder: Path, rank: int, seed: int = 0) -> tuple[Path, Path]:
    layout = flux_layout()
    g = torch.Generator().manual_seed(seed)
    paths = []
    for which in ("a", "b"):
        sd = {}
        for name, (d_out, d_in) in layout.items():
            sd[f"{name}.lora_down.weight"] = (torch.randn(rank, d_in, generator=g) / d_in**0.5).to(torch.bfloat16)
            sd[f"{name}.lora_up.weight"] = (torch.randn(d_out, rank, generator=g) * 0.02).to(torch.bfloat16)
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
        p = folder / f"flux_{which}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
    return paths[0], paths[1]


def write_lokr(folder: Path, factor: int = 4, rank: int = 16, seed: int = 1) -> Path:
    """A full-size FLUX.1 LoKr file (same 228 modules): ``lokr_w1`` (factor×factor) full, ``lokr_w2_a/b``
    of rank ``rank``, bf16, alpha = rank."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (d_out, d_in) in flux_layout().items():
        c, d = d_out // factor, d_in // factor
        sd[f"{name}.lokr_w1"] = torch.randn(factor, factor, generator=g).to(torch.bfloat16)
        sd[f"{name}.lokr_w2_a"] = (torch.randn(c, rank, generator=g) * 0.02).to(torch.bfloat16)
        sd[f"{name}.lokr_w2_b"] = (torch.randn(rank, d, generator=g) / d**0.5).to(torch.bfloat16)
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    p = folder / "flux_lokr.safetensors"
    save_file(sd, str(p))
    return p


def lokr_conversion(folder: Path, rank: int) -> dict:
    """Time ``convert --to kohya --rank K`` of the full-size LoKr file and report its ΔW error."""
    import lora_merge
    from lora_merge.formats.lycoris import to_lora

    src = write_lokr(folder)
    t = time.perf_counter()
    lo, rep = to_lora(lora_merge.load(src), rank)
    out = lora_merge.save(lo, folder / "lokr_as_lora.safetensors", to="kohya", dtype=torch.bfloat16, force=True)
    dt = time.perf_counter() - t
    return {"seconds": dt, "rank": rank, "rel_error_overall": rep["rel_error_overall"],
            "rel_error_max": rep["rel_error_max"], "output_bytes": out.stat().st_size}


def floor(a: Path, b: Path, out: Path) -> None:
    load_concat_save(a, b, out, alpha_dtype=torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--keep", type=Path, default=None, help="write the pair here (and keep it)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--lokr", action="store_true", help="also time a full-size LoKr → LoRA conversion")
    args = ap.parse_args(argv)

    import lora_merge

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        a, b = write_pair(folder, args.rank)
        build = time.perf_counter() - t0
        out = folder / "out.safetensors"

        def run(kind):
            if out.exists():
                out.unlink()
            t = time.perf_counter()
            if kind == "floor":
                floor(a, b, out)
            elif kind == "linear":
                lora_merge.merge([a, b], out, to="kohya", dtype="bf16")
            else:
                lora_merge.merge([a, b], out, to="kohya", dtype="bf16", rank=args.rank)
            return time.perf_counter() - t

        kinds = ("floor", "linear", f"rank{args.rank}")
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for k in kinds:
            run(k)  # warm-up (page cache, lazy imports)
        for _ in range(args.rounds):
            for k in kinds:  # interleaved, so machine load hits every variant alike
                times[k].append(run(k))
        med = {k: statistics.median(v) for k, v in times.items()}
        res = {"modules": len(flux_layout()), "rank": args.rank, "input_bytes": a.stat().st_size,
               "build_s": build, "median_s": med,
               "ratio": {k: med[k] / med["floor"] for k in kinds}, "rounds": args.rounds,
               "min_s": {k: min(v) for k, v in times.items()},
               "ratio_of_min": {k: min(times[k]) / min(times["floor"]) for k in kinds},
               "threads": torch.get_num_threads()}
        if args.lokr:
            res["lokr_to_lora"] = lokr_conversion(folder, args.rank)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"FLUX.1 pair: {res['modules']} modules, rank {args.rank}, bf16, {res['input_bytes'] / 1e6:.0f} MB "
              f"each; median of {args.rounds} rounds")
        for k in kinds:
            print(f"  {k:<8} {med[k]:7.2f} s  {res['ratio'][k]:5.2f}x floor  "
                  f"(range {min(times[k]):.2f}-{max(times[k]):.2f} s; best/best {res['ratio_of_min'][k]:.2f}x)")
    if "lokr_to_lora" in res:
        lk = res["lokr_to_lora"]
        print(f"  LoKr → LoRA rank {lk['rank']}: {lk['seconds']:.1f} s, relative ΔW error "
              f"{lk['rel_error_overall']:.3g} overall, {lk['rel_error_max']:.3g} at worst")
    return 0


if __name__ == "__main__":
    sys.exit(main())
