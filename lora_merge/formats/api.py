"""Public Python API: :func:`load`, :func:`save`, :func:`convert`. The CLI is a thin layer over these."""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .adapter import Adapter, TensorRef
from .errors import FormatError, OutputExistsError, PartialReadWarning, UsageError
from .formats import WRITERS, check_supported, detect_dialect
from .formats import diffusers as _diffusers
from .formats import kohya as _kohya
from .formats import peft as _peft
from .formats.safetensors_io import _umask, lazy_refs, read_header, write_atomic

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_LISTED = 8


# ------------------------------------------------------------------------------------------------ load
def load(path: str | os.PathLike, *, format: str | None = None, strict: bool = False,
         allow_pickle: bool = False) -> Adapter:
    """Read a LoRA file or PEFT folder; tensors stay lazy (only the header is read).

    ``format`` forces ``"kohya"``, ``"diffusers"`` or ``"peft"``. Keys that do not parse are reported
    with a :class:`PartialReadWarning` (a :class:`FormatError` when ``strict``). Pickle files
    (``.bin``/``.pt``/``.ckpt``) are refused unless ``allow_pickle`` (then read with
    ``torch.load(weights_only=True)``, never a full unpickle).
    """
    if format is not None and format not in WRITERS:
        raise UsageError(f"unknown format {format!r} (choose from {', '.join(WRITERS)})")
    p = Path(path)
    if not p.exists():
        raise FormatError("no such file or folder", p)
    config: dict | None = None
    weights = p
    if p.is_dir():
        cfg_path = p / _peft.CONFIG_NAME
        weights = p / _peft.WEIGHTS_NAME
        if not weights.exists() and (p / _peft.PICKLE_WEIGHTS_NAME).exists():
            weights = p / _peft.PICKLE_WEIGHTS_NAME
        if not weights.exists():
            raise FormatError(f"folder has no {_peft.WEIGHTS_NAME} (not a PEFT adapter folder)", p)
        if cfg_path.exists():
            config = _peft.read_config(cfg_path)
    else:
        sibling = p.parent / _peft.CONFIG_NAME
        if p.name in (_peft.WEIGHTS_NAME, _peft.PICKLE_WEIGHTS_NAME) and sibling.exists():
            config = _peft.read_config(sibling)

    refs, metadata = _read_tensors(weights, allow_pickle)
    check_supported(refs.keys(), weights, config)
    if format is None:
        if config is not None:
            format = "peft"
        else:
            try:
                format = detect_dialect(refs.keys(), metadata)
            except FormatError as e:
                raise FormatError(e.message, weights) from None
    if format == "kohya":
        ad = _kohya.read(refs, metadata, weights)
    elif format == "diffusers":
        ad = _diffusers.read(refs, metadata, weights)
    else:
        ad = _peft.read(refs, metadata, weights, config)
    ad.source = p
    if not ad.modules:
        raise FormatError(f"no {format} LoRA modules found ({len(refs)} tensors, none parsed)", weights)
    if ad.unparsed_keys:
        more = ", …" if len(ad.unparsed_keys) > _MAX_LISTED else ""
        shown = ", ".join(ad.unparsed_keys[:_MAX_LISTED]) + more
        msg = f"{len(ad.unparsed_keys)} keys not understood as {format} LoRA and skipped: {shown}"
        if strict:
            raise FormatError(msg, weights)
        warnings.warn(f"{weights}: {msg}", PartialReadWarning, stacklevel=2)
    return ad


def _read_tensors(path: Path, allow_pickle: bool) -> tuple[dict[str, TensorRef], dict[str, str]]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FormatError(f"{path.suffix} is a pickle file; refused (pickle can run code). Convert it to "
                              "safetensors, or pass allow_pickle=True / --allow-pickle if you trust it", path)
        return _read_pickle(path), {}
    header = read_header(path)
    return lazy_refs(header), header.metadata


def _read_pickle(path: Path) -> dict[str, TensorRef]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, ... all mean "bad file"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FormatError(f"cannot read pickle file with weights_only=True: {first}", path) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise FormatError("pickle file does not hold a flat dict of tensors", path)
    return {k: TensorRef.from_tensor(v, k) for k, v in obj.items()}


# ------------------------------------------------------------------------------------------------ save
def _input_paths(adapter: Adapter) -> set[Path]:
    """Every file or folder the adapter reads from (never to be written over)."""
    out: set[Path] = set()
    if adapter.source is not None:
        out.add(Path(adapter.source).resolve())
    refs = [r for m in adapter for r in (m.down, m.up)] + list(adapter.extra_tensors.values())
    for r in refs:
        if r.handle is not None:
            f = Path(r.handle.path).resolve()
            out.update((f, f.parent if f.name == _peft.WEIGHTS_NAME else f))
    return out


def _guard(targets: list[Path], adapter: Adapter, force: bool, out: Path) -> None:
    inputs = _input_paths(adapter)
    for t in [out, *targets]:
        rt = t.resolve()
        if rt in inputs or any(rt == i / _peft.WEIGHTS_NAME or rt == i / _peft.CONFIG_NAME for i in inputs):
            raise OutputExistsError("refusing to write over an input (choose another output path)", t)
    if not force:
        for t in targets:
            if t.exists():
                raise OutputExistsError("output exists; pass force=True / --force to overwrite", t)


def save(
    adapter: Adapter,
    path: str | os.PathLike,
    *,
    to: str | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``adapter`` in dialect ``to`` (default: the adapter's own, else diffusers); returns the path.

    PEFT output is a folder (``adapter_config.json`` + ``adapter_model.safetensors``). Refuses an
    existing output unless ``force``, and any input even with ``force``. Files are written to a temp
    file and renamed, so an error never leaves a partial file.
    """
    to = to or adapter.dialect or "diffusers"
    if to not in WRITERS:
        raise UsageError(f"unknown output format {to!r} (choose from {', '.join(WRITERS)})")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise UsageError("metadata must map strings to strings")
    if dtype is not None and not dtype.is_floating_point:
        raise UsageError(f"dtype must be a floating-point type, got {dtype}")
    if not adapter.modules:
        raise UsageError("adapter has no LoRA modules to write")
    out = Path(path)
    if to == "peft":
        if out.suffix == ".safetensors":
            raise UsageError(f"{out}: a PEFT adapter is a folder; give a folder path, not a .safetensors "
                             "file")
        files = [out / _peft.WEIGHTS_NAME, out / _peft.CONFIG_NAME]
        if out.exists() and not out.is_dir():
            raise OutputExistsError("output exists and is not a folder", out)
        _guard(files, adapter, force, out)
        tensors, md, cfg = _peft.write(adapter, dtype, metadata or {})
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(files[0], tensors, md)
        _write_text_atomic(files[1], json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return out
    if out.is_dir():
        raise OutputExistsError("output is a folder; give a .safetensors file path", out)
    _guard([out], adapter, force, out)
    if not out.parent.exists():
        raise UsageError(f"{out}: folder {out.parent} does not exist")
    if adapter.extra_tensors:
        warnings.warn(f"{out}: the {to} dialect cannot hold modules_to_save tensors; not written: "
                      f"{', '.join(sorted(adapter.extra_tensors))}", UserWarning, stacklevel=2)
    writer = _kohya.write if to == "kohya" else _diffusers.write
    tensors, md = writer(adapter, dtype, metadata or {})
    return write_atomic(out, tensors, md)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, format: str | None = None,
            force: bool = False, strict: bool = False) -> Path:
    """``load(src)`` then ``save(..., to=to)``; every module's ΔW is unchanged."""
    return save(load(src, format=format, strict=strict), dst, to=to, force=force)
