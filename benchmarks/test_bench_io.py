"""I/O benchmarks (issue 2): header-only inspect and full reads of a synthetic SDXL-sized LoRA.

    python -m pytest benchmarks/test_bench_io.py -q --benchmark-only

Targets: header-only inspect of the ~370 MB SDXL-sized file ≈ 1× the same on a tiny file; a full read
(``lora_merge.load`` + loading every tensor) ≤ 1.2× ``safetensors.torch.load_file`` of the same file.
"""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

import lora_merge
from lora_merge.inspect import summarize


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
    record_ratio("inspect header: SDXL r128 / tiny", "ours", benchmark)


@pytest.mark.benchmark(group="inspect-header")
def test_inspect_header_tiny(benchmark, tiny_lora, record_ratio):
    s = benchmark.pedantic(_inspect, args=(tiny_lora,), rounds=15, warmup_rounds=2)
    assert s["num_modules"] == 4
    record_ratio("inspect header: SDXL r128 / tiny", "baseline", benchmark)


@pytest.mark.benchmark(group="full-read")
def test_full_read_lora_merge(benchmark, sdxl_lora, record_ratio):
    tensors = benchmark.pedantic(_full_read, args=(sdxl_lora,), rounds=7, warmup_rounds=1)
    assert len(tensors) == 2 * 560
    record_ratio("full read: lora_merge.load / load_file", "ours", benchmark)


@pytest.mark.benchmark(group="full-read")
def test_full_read_safetensors_baseline(benchmark, sdxl_lora, record_ratio):
    tensors = benchmark.pedantic(load_file, args=(str(sdxl_lora),), rounds=7, warmup_rounds=1)
    assert len(tensors) == 3 * 560
    record_ratio("full read: lora_merge.load / load_file", "baseline", benchmark)
