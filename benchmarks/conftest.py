"""Shared benchmark fixtures.

Run with ``python -m pytest benchmarks -q --benchmark-only`` (``pytest -q`` at the repo root runs only
``tests/``).  Ratios against a baseline measured in the same run are printed at the end of the session:
a benchmark records its result with ``record_ratio(group, role, benchmark)`` where role is ``"ours"`` or
``"baseline"``.

``sdxl_lora`` builds a synthetic SDXL-sized kohya LoRA once per session: every attention projection
(``attn1``/``attn2`` ``to_q``/``to_k``/``to_v``/``to_out.0``, 560 layers) of the real SDXL base UNet
config, instantiated on the meta device (no weights, nothing downloaded), rank 128, fp16, with kohya SGM
key names, per-module alpha and kohya training metadata — the shape of a typical large SDXL LoRA
(~370 MB).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the layers)
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

_ATTN_PROJ = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")

# diffusers attention block -> SGM (kohya SDXL) block, see docs/formats.md
_SGM_ATTN = {
    "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.attentions.1": "input_blocks.5.1",
    "down_blocks.2.attentions.0": "input_blocks.7.1",
    "down_blocks.2.attentions.1": "input_blocks.8.1",
    "mid_block.attentions.0": "middle_block.1",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.attentions.2": "output_blocks.2.1",
    "up_blocks.1.attentions.0": "output_blocks.3.1",
    "up_blocks.1.attentions.1": "output_blocks.4.1",
    "up_blocks.1.attentions.2": "output_blocks.5.1",
}


def sdxl_attention_projections() -> list[tuple[str, int, int]]:
    """``(diffusers module path, in_features, out_features)`` of every SDXL UNet attention projection."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return [(n, m.in_features, m.out_features) for n, m in unet.named_modules() if _ATTN_PROJ.search(n)]


def kohya_sgm_key(diffusers_path: str) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` → ``lora_unet_input_blocks_4_1_...``."""
    m = re.match(r"((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.0)\.(.*)", diffusers_path)
    assert m, diffusers_path
    return "lora_unet_" + f"{_SGM_ATTN[m.group(1)]}.{m.group(2)}".replace(".", "_")


def write_kohya_lora(path: Path, layers: list[tuple[str, int, int]], rank: int, alpha: float,
                     dtype=torch.float16, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, d_in, d_out in layers:
        key = kohya_sgm_key(name)
        tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, d_in, generator=g) / d_in**0.5).to(dtype)
        tensors[f"{key}.lora_up.weight"] = (torch.randn(d_out, rank, generator=g) * 1e-3).to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="session")
def sdxl_layers() -> list[tuple[str, int, int]]:
    return sdxl_attention_projections()


@pytest.fixture(scope="session")
def sdxl_lora(tmp_path_factory, sdxl_layers) -> Path:
    """Synthetic SDXL-sized kohya LoRA: 560 attention projections, rank 128, fp16 (built once per session)."""
    return write_kohya_lora(tmp_path_factory.mktemp("sdxl") / "sdxl_rank128.safetensors", sdxl_layers, 128, 64.0)


@pytest.fixture(scope="session")
def sdxl_lora_rank1(tmp_path_factory, sdxl_layers) -> Path:
    """The same 560 modules, keys and metadata at rank 1 (~3 MB): the same header, 128× less data."""
    return write_kohya_lora(tmp_path_factory.mktemp("sdxl_r1") / "sdxl_rank1.safetensors", sdxl_layers, 1, 1.0)


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, sdxl_layers) -> Path:
    """The same dialect and metadata, but only four projections of rank 4 (a tiny header too)."""
    return write_kohya_lora(tmp_path_factory.mktemp("tiny") / "tiny_rank4.safetensors", sdxl_layers[:4], 4, 4.0)


# ---- ratios against baselines measured in the same run ----

_RESULTS: dict[str, dict[str, float]] = {}


@pytest.fixture
def record_ratio():
    """``record_ratio(group, role, benchmark)``: remember the benchmark's median under ``group``/``role``."""

    def record(group: str, role: str, benchmark) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return
        _RESULTS.setdefault(group, {})[role] = float(stats.stats.median)

    return record


def pytest_terminal_summary(terminalreporter):
    rows = [(g, r["ours"], r["baseline"]) for g, r in sorted(_RESULTS.items()) if {"ours", "baseline"} <= set(r)]
    if not rows:
        return
    terminalreporter.section("ratios (median, ours / baseline, same run)")
    for group, ours, base in rows:
        terminalreporter.write_line(f"{group:<40} {ours * 1e3:10.2f} ms / {base * 1e3:10.2f} ms = {ours / base:6.2f}x")


# ---- merge benchmarks ----
@pytest.fixture(scope="session")
def sdxl_merge_pair(tmp_path_factory, sdxl_layers) -> tuple[Path, Path]:
    """Two synthetic SDXL attention LoRAs (560 layers, rank 64, fp16, kohya SGM keys; alpha 32 and 64)."""
    d = tmp_path_factory.mktemp("sdxl_pair")
    return (write_kohya_lora(d / "a_r64.safetensors", sdxl_layers, 64, 32.0, seed=1),
            write_kohya_lora(d / "b_r64.safetensors", sdxl_layers, 64, 64.0, seed=2))  # fmt: skip
