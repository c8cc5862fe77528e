"""I/O benchmarks: header-only inspect and full reads of a synthetic SDXL-sized LoRA.

    python -m pytest benchmarks/test_bench_io.py -q --benchmark-only

Targets: header-only inspect of the ~370 MB SDXL-sized file ≈ 1× a tiny file (measured against both a
~3 MB file with the same 560 modules at rank 1, which isolates any dependence on the data size, and a
4-module file); a full read (``lora_merge.load`` + loading every tensor) ≤ 1.2×
``safetensors.torch.load_file`` of the same file.
"""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

import lora_merge
from lora_merge.analysis.inspection import summarize


def _inspect(path):
    return summarize(lora_merge.load(path))


def _full_read(path):
    adapter = lora_merge.load(path)
    out = []
    for m in adapter:
        out.append(m.down.load())
        out.append(m.up.load())
    out.extend(t.load() for t in adapter.extra_tensors.values())
    return out


@pytest.mark.benchmark(group="inspect-header")
def test_inspect_header_sdxl(benchmark, sdxl_lora, record_ratio):
    s = benchmark.pedantic(_inspect, args=(sdxl_lora,), rounds=15, warmup_rounds=2)
    assert s["num_modules"] == 560 and s["ranks"]["max"] == 128
    record_ratio("inspect header: SDXL r128 / same keys r1", "ours", benchmark)
    record_ratio("inspect header: SDXL r128 / 4-module file", "ours", benchmark)


@pytest.mark.benchmark(group="inspect-header")
def test_inspect_header_same_keys_rank1(benchmark, sdxl_lora_rank1, record_ratio):
    """Same header (560 modules), 128× less tensor data: a ratio ≈ 1 means inspect never reads the data."""
    s = benchmark.pedantic(_inspect, args=(sdxl_lora_rank1,), rounds=15, warmup_rounds=2)
    assert s["num_modules"] == 560 and s["ranks"]["max"] == 1
    record_ratio("inspect header: SDXL r128 / same keys r1", "baseline", benchmark)


@pytest.mark.benchmark(group="inspect-header")
def test_inspect_header_tiny(benchmark, tiny_lora, record_ratio):
    """A 4-module file: the floor (what any per-module header work costs on top of it)."""
    s = benchmark.pedantic(_inspect, args=(tiny_lora,), rounds=15, warmup_rounds=2)
    assert s["num_modules"] == 4
    record_ratio("inspect header: SDXL r128 / 4-module file", "baseline", benchmark)


@pytest.mark.benchmark(group="full-read")
def test_full_read_lora_merge(benchmark, sdxl_lora, record_ratio):
    tensors = benchmark.pedantic(_full_read, args=(sdxl_lora,), rounds=7, warmup_rounds=1)
    assert len(tensors) == 2 * 560
    record_ratio("full read: lora_merge.load / load_file", "ours", benchmark)


@pytest.mark.benchmark(group="full-read")
def test_full_read_safetensors_baseline(benchmark, sdxl_lora, record_ratio):
    tensors = benchmark.pedantic(load_file, args=(str(sdxl_lora),), rounds=7, warmup_rounds=1)
    assert len(tensors) == 3 * 560
    for group in ("full read: lora_merge.load / load_file", "full read, split: load() only / load_file",
                  "full read, split: tensor loads only / load_file"):
        record_ratio(group, "baseline", benchmark)


@pytest.mark.benchmark(group="full-read")
def test_full_read_split_load_only(benchmark, sdxl_lora, record_ratio):
    """The fixed cost of ``load()``: header, dialect detection, names, alphas (no factor data)."""
    adapter = benchmark.pedantic(lora_merge.load, args=(sdxl_lora,), rounds=7, warmup_rounds=1)
    assert len(adapter) == 560
    record_ratio("full read, split: load() only / load_file", "ours", benchmark)


@pytest.mark.benchmark(group="full-read")
def test_full_read_split_tensor_loads_only(benchmark, sdxl_lora, record_ratio):
    """Loading the 1120 factor tensors of an already loaded adapter (fresh adapter each round)."""

    def setup():
        return (lora_merge.load(sdxl_lora),), {}

    def load_all(adapter):
        return [t.load() for m in adapter for t in (m.down, m.up)]

    tensors = benchmark.pedantic(load_all, setup=setup, rounds=7, warmup_rounds=1)
    assert len(tensors) == 2 * 560
    record_ratio("full read, split: tensor loads only / load_file", "ours", benchmark)
