"""Public Python API: :func:`load`, :func:`save`, :func:`convert` (re-exported as ``lora_merge.load`` …).
The CLI is a thin layer over these.  They loop over the dialect registry (:mod:`lora_merge.formats`)
and never name a dialect.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..adapter import Adapter, TensorRef
from ..errors import FormatError, OutputExistsError, PartialReadWarning, UsageError
from ..files import atomic_write_text, make_dirs, open_input, refuse_existing
from ..linalg import all_finite
from .bias import attach_bias_deltas, split_bias_keys, warn_dropped
from .clients import check_writable
from .dora import apply_dora, is_dora_key
from .layout import align
from .lycoris import has_lycoris, needs_rank
from .peft_carry import carried_config, head_tensors, restore, split_heads
from .registry import Located, detect_dialect, get_dialect, registered
from .repair import broken_pattern, repair_keys, unparsed_hint
from .safetensors_io import lazy_refs, read_header, write_atomic
from .unsupported import check_supported

__all__ = ["convert", "load", "save"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_LISTED = 8


# ------------------------------------------------------------------------------------------------ load
def load(path: str | os.PathLike, *, format: str | None = None, strict: bool = False,
         allow_pickle: bool = False, base_weights: str | os.PathLike | None = None,
         repair: bool = False) -> Adapter:
    """Read a LoRA file or PEFT folder; tensors stay lazy (only the header is read).

    ``format`` forces a registered dialect (``"kohya"``, ``"diffusers"``, ``"peft"``, …); otherwise a
    dialect that recognises the path's layout (a PEFT folder) reads it, or the keys vote.  Keys that do
    not parse are reported with a :class:`PartialReadWarning` (a :class:`FormatError` when ``strict``).
    ``base_weights`` (a model ``.safetensors``) makes DoRA modules exact dense updates
    (:mod:`lora_merge.formats.dora`); without it a DoRA file is refused.
    Pickle files (``.bin``/``.pt``/``.ckpt``) are refused unless ``allow_pickle`` (then read with
    ``torch.load(weights_only=True)``, never a full unpickle).  ``repair`` renames the keys of a known
    broken layout first (:mod:`lora_merge.formats.repair`); errors about keys we do not understand show a
    couple of them and a hint when they match such a layout.
    """
    if format is not None:
        get_dialect(format)
    p = Path(path)
    if not p.exists():
        raise FormatError("no such file or folder", p)
    by, found = _locate(p)
    weights, config = found.weights, found.config

    refs, metadata = _read_tensors(weights, allow_pickle)
    if repair:
        refs, _fixed = repair_keys(refs)
    refs, heads = split_heads(refs)  # modules_to_save tensors a single-file dialect carried (peft_carry)
    refs, bias = split_bias_keys(refs)  # diff_b: attached to their modules once read (formats/bias.py)
    if base_weights is None:
        check_supported(refs.keys(), weights, config)
    else:  # DoRA is exact with the base model's weights (formats/dora.py)
        check_supported([k for k in refs if not is_dora_key(k)], weights,
                        {**config, "use_dora": False} if config else config)
    if format is None:
        if by is not None and found.certain:
            format = by
        else:
            try:
                format = detect_dialect(refs.keys(), metadata)
            except FormatError as e:
                raise FormatError(e.message + unparsed_hint(refs), weights) from None
    ad = restore(get_dialect(format).read(refs, metadata, weights, config), heads)
    ad.source = p
    if base_weights is not None:
        ad = apply_dora(ad, refs, base_weights, weights)
    if bias:
        ad = attach_bias_deltas(ad, bias, weights)
    if not ad.modules:
        raise FormatError(f"no {format} LoRA modules found ({len(refs)} tensors, none parsed)"
                          + unparsed_hint(refs), weights)
    if ad.unparsed_keys:
        more = ", …" if len(ad.unparsed_keys) > _MAX_LISTED else ""
        shown = ", ".join(k if len(k) <= 120 else f"{k[:120]}…" for k in ad.unparsed_keys[:_MAX_LISTED]) + more
        msg = f"{len(ad.unparsed_keys)} keys not understood as {format} LoRA and skipped: {shown}"
        hint = broken_pattern(ad.unparsed_keys)
        if hint:
            msg += f"; {hint}"
        if strict:
            raise FormatError(msg, weights)
        warnings.warn(f"{weights}: {msg}", PartialReadWarning, stacklevel=2)
    return ad


def _locate(p: Path) -> tuple[str | None, Located]:
    """``(name, Located)`` of the first registered dialect that recognises ``p`` by its layout (a PEFT
    folder, …); ``(None, Located(p, None))`` for a file none of them recognises."""
    for d in registered():
        hit = d.locate(p)
        if hit is not None:
            return d.name, hit
    if p.is_dir():
        raise FormatError("a folder, but no registered dialect reads folders", p)
    return None, Located(p, None)


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
        with open_input(path) as fh:  # a regular file only (a FIFO would block)
            obj = torch.load(fh, map_location="cpu", weights_only=True)
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
def _folder_files(folder: Path) -> list[Path]:
    """The files a folder dialect keeps in ``folder`` (PEFT's weights and config)."""
    return [folder / n for d in registered() for n in d.folder_files]


def _input_files(adapter: Adapter) -> set[Path]:
    """Every file the adapter reads from, and the companions of a folder it was read from (PEFT's
    config): never to be written over."""
    out: set[Path] = set()
    weights_names = {d.folder_files[0] for d in registered() if d.folder_files}
    if adapter.source is not None:
        src = Path(adapter.source).resolve()
        out.update(_folder_files(src) if src.is_dir() else [src])
    refs = [r for m in adapter for r in (m.down, m.up)] + list(adapter.extra_tensors.values())
    for r in refs:
        if r.handle is not None:
            f = Path(r.handle.path).resolve()
            out.add(f)
            if f.name in weights_names:
                out.update(_folder_files(f.parent))
    return out


def _guard(targets: list[Path], adapter: Adapter, force: bool) -> None:
    """Refuse to write any of ``targets`` over an input (even with ``force``), then over an existing file."""
    inputs = _input_files(adapter)
    for t in targets:
        refuse_existing(t, True, inputs)
    for t in targets:
        refuse_existing(t, force)


def save(
    adapter: Adapter,
    path: str | os.PathLike,
    *,
    to: str | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    metadata: dict[str, str] | None = None,
    keep_heads: bool = False,
) -> Path:
    """Write ``adapter`` in dialect ``to`` (default: the adapter's own, else diffusers); returns the path.

    PEFT output is a folder (``adapter_config.json`` + ``adapter_model.safetensors``). Refuses an
    existing output unless ``force``, and any input even with ``force``. Files are written to a temp
    file and renamed, so an error never leaves a partial file.  A PEFT adapter's config goes into a
    single-file dialect's metadata, and its ``modules_to_save`` tensors too with ``keep_heads``
    (:mod:`lora_merge.formats.peft_carry`), so converting back restores the adapter.
    """
    to = to or adapter.dialect or "diffusers"
    dialect = get_dialect(to, what="output format")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise UsageError("metadata must map strings to strings")
    if dtype is not None and not dtype.is_floating_point:
        raise UsageError(f"dtype must be a floating-point type, got {dtype}")
    if not adapter.modules:
        raise UsageError("adapter has no LoRA modules to write")
    check_writable(adapter, dialect.name)
    out = Path(path)
    if dialect.folder_files:
        if out.suffix == ".safetensors":
            raise UsageError(f"{out}: a {dialect.label} adapter is a folder; give a folder path, not a "
                             ".safetensors file")
        if out.exists() and not out.is_dir():
            raise OutputExistsError("output exists and is not a folder", out)
        targets = [out / n for n in dialect.folder_files]
    else:
        if out.is_dir():
            raise OutputExistsError("output is a folder; give a .safetensors file path", out)
        targets = [out]
    _guard(targets, adapter, force)
    if not dialect.folder_files and not out.parent.exists():
        raise UsageError(f"{out}: folder {out.parent} does not exist")
    if adapter.extra_tensors and not dialect.keeps_extra_tensors and not keep_heads:
        warnings.warn(f"{out}: the {to} dialect cannot hold modules_to_save tensors; not written: "
                      f"{', '.join(sorted(adapter.extra_tensors))} (keep_heads=True / --keep-heads stores them "
                      "in the file for lora-merge to restore; LoRA loaders ignore them)", UserWarning, stacklevel=2)
    if has_lycoris(adapter):
        raise needs_rank(adapter, "write it as a LoRA")
    warn_dropped(adapter, dialect.name, out)
    written = dialect.write(align(adapter, dialect.name), dtype, metadata or {})
    if not dialect.keeps_extra_tensors:
        written.metadata.update(carried_config(adapter))
        if keep_heads:
            written.tensors.update(head_tensors(adapter, dtype))
    _check_stored_finite(written.tensors, dtype, out)
    if dialect.folder_files:
        make_dirs(out)  # inside a merge's or convert's transaction: removed again if it does not finish
        write_atomic(targets[0], written.tensors, written.metadata)
        for name, text in written.files.items():
            atomic_write_text(out / name, text)
        return out
    return write_atomic(out, written.tensors, written.metadata)


def _check_stored_finite(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, out: Path) -> None:
    """Every value read was finite (the readers check), so a non-finite tensor here is one the output
    dtype cannot hold (1e40 as fp32, 7e4 as fp16): an error naming it, never a file of infinities."""
    for key, t in tensors.items():
        if t.is_floating_point() and not all_finite(t):
            name = str(t.dtype).replace("torch.", "")
            wider = " or keep the inputs' dtype" if dtype is not None else ""
            raise FormatError(f"tensor {key[:120]!r} has values beyond the range of {name} "
                              f"(±{torch.finfo(t.dtype).max:.3g}); write a wider --dtype{wider}", out)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, format: str | None = None,
            force: bool = False, strict: bool = False, keep_heads: bool = False) -> Path:
    """``load(src)`` then ``save(..., to=to)``; every module's ΔW is unchanged."""
    return save(load(src, format=format, strict=strict), dst, to=to, force=force, keep_heads=keep_heads)
