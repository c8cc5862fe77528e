"""What a merge writes besides the adapter: its metadata, the report JSON, the strategy's sidecar files,
and the input hashes the recipe records."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..files import atomic_write_json, input_sha256, refuse_existing
from ..formats.safetensors_io import write_atomic
from ..strategies import MergeStrategy
from .recipe import METADATA_KEY

__all__ = ["InputHasher", "adapter_metadata", "check_sidecars", "mask_sidecar_path", "sidecar_path", "write_report", "write_sidecars"]


class InputHasher:
    """sha256 of the input files on other threads while the layers merge (hashlib releases the GIL); one
    thread per file: sha256 (~1.4 GB/s per core here) is the longest single piece of a linear merge."""

    def __init__(self, paths: Sequence[Path | None], workers: int):
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(len(paths), workers)))
        self._futures: list[Future | None] = [
            self._pool.submit(input_sha256, p) if p is not None else None for p in paths
        ]

    def results(self) -> list[str | None]:
        return [f.result() if f is not None else None for f in self._futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def adapter_metadata(merged: Adapter, recipe: dict[str, Any], names: Sequence[str]) -> dict[str, str]:
    """The merged file's metadata: its recipe, kohya's rank fields and where it came from."""
    ranks = {m.rank for m in merged}
    # kohya writes "Dynamic" when ranks differ between modules (resize_lora.py --dynamic_method)
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    return {
        METADATA_KEY: json.dumps(recipe, sort_keys=False),
        "ss_network_dim": dim,
        "ss_network_alpha": dim,  # alpha = rank per module (scale 1): the strength lives in the factors
        "modelspec.merged_from": ", ".join(Path(nm).name for nm in names),
    }


def sidecar_path(output: str | os.PathLike, suffix: str) -> Path:
    """``<output>.<suffix>.safetensors`` next to the output (file or folder)."""
    out = Path(output)
    return out.with_name(f"{out.name}.{suffix}.safetensors")


def mask_sidecar_path(output: str | os.PathLike) -> Path:
    """Where a mask strategy's masks go: ``<output>.masks.safetensors``."""
    return sidecar_path(output, "masks")


def check_sidecars(strategy: MergeStrategy, output: Path, force: bool, inputs: Sequence[Path | None]) -> None:
    """Refuse up front the sidecars a strategy will write (same rules as the main output)."""
    for suffix in getattr(strategy, "sidecar_suffixes", ()):
        refuse_existing(sidecar_path(output, suffix), force, inputs)


def write_sidecars(strategy: MergeStrategy, written: Path, recipe: dict[str, Any], force: bool,
                   inputs: Sequence[Path | None]) -> list[Path]:
    """Each of :meth:`MergeStrategy.sidecars` as ``<output>.<suffix>.safetensors`` (deterministic bytes:
    tensors and metadata in sorted order)."""
    out = []
    for suffix, tensors in sorted(strategy.sidecars().items()):
        if not tensors:
            continue
        path = sidecar_path(written, suffix)
        refuse_existing(path, force, inputs)
        md = {METADATA_KEY: json.dumps(recipe), f"lora_merge.{suffix}_of": written.name}
        write_atomic(path, tensors, md)
        out.append(path)
    return out


def write_report(path: Path, report: dict[str, Any]) -> None:
    atomic_write_json(path, report)
