"""DuoLoRA / ZipLoRA from the files alone on a synthetic SDXL attention pair.

    OMP_NUM_THREADS=1 python -m pytest benchmarks/test_bench_duolora.py -q --benchmark-only

The pair: every attention projection of the real SDXL UNet config (560 linear layers, built on the meta
device, no weights), rank 64, the style LoRA's input directions overlapping the content LoRA's by half
(``benchmarks/sdxl_pair.py``).  Timed: the whole merge from the two in-memory adapters to the merged
adapter (``lora_merge.merge``: every layer's Gram products, closed form, 100 Adam steps, folding), default
parameters.  Target: ``duolora`` under 5 s on a laptop CPU; ``ziplora`` (18.6× more trainable values) and
the exact ``linear`` merge are timed on the same pair as references (ratios printed at the end).
Each benchmark also stores the process CPU time of one merge in ``extra_info["cpu_s"]`` (shown with
``--benchmark-columns=min,median,mean`` and in ``--benchmark-json``): with ``OMP_NUM_THREADS=1`` that is
what the merge costs on one idle core, a fairer number than wall time on a shared machine.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import pytest

import lora_merge as lm

sys.path.insert(0, str(Path(__file__).parent))
from sdxl_pair import sdxl_attention_layout, synthetic_pair


@pytest.fixture(scope="module")
def sdxl_pair():
    pytest.importorskip("diffusers")
    return synthetic_pair(sdxl_attention_layout(), rank=64, overlap=0.5)


def _merge(pair, strategy, cpu: list):
    t = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lm.merge(list(pair), None, strategy=strategy, arch="sdxl")
    cpu.append(time.process_time() - t)
    return res


def _run(benchmark, pair, strategy):
    cpu: list[float] = []
    res = benchmark.pedantic(_merge, args=(pair, strategy, cpu), rounds=2, warmup_rounds=0)
    benchmark.extra_info["cpu_s"] = min(cpu)
    print(f"\n{strategy}: CPU time of one merge {min(cpu):.2f} s (min of {len(cpu)})")
    return res


@pytest.mark.benchmark(group="duolora-sdxl")
def test_duolora_sdxl_pair(benchmark, sdxl_pair, record_ratio):
    res = _run(benchmark, sdxl_pair, "duolora")
    assert res.report["strategy"]["trainable_values"] == 71_680
    record_ratio("duolora / linear, SDXL attention pair r64", "ours", benchmark)


@pytest.mark.benchmark(group="duolora-sdxl")
def test_ziplora_sdxl_pair(benchmark, sdxl_pair, record_ratio):
    res = _run(benchmark, sdxl_pair, "ziplora")
    assert res.report["strategy"]["trainable_values"] == 1_331_200
    record_ratio("ziplora / linear, SDXL attention pair r64", "ours", benchmark)


@pytest.mark.benchmark(group="duolora-sdxl")
def test_linear_sdxl_pair(benchmark, sdxl_pair, record_ratio):
    _run(benchmark, sdxl_pair, "linear")
    record_ratio("duolora / linear, SDXL attention pair r64", "baseline", benchmark)
    record_ratio("ziplora / linear, SDXL attention pair r64", "baseline", benchmark)
