"""Safe reading and atomic writing of ``.safetensors`` files.

The header is parsed and validated here (length prefix, JSON, dtypes, shapes, offsets against the
file size) before the Rust library ever sees the file, so malformed input becomes a
:class:`~lora_merge.errors.FormatError` naming the file and the problem instead of a crash.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import TensorRef, _SafetensorsHandle
from ..errors import FormatError, quoted
from ..files import atomic_write, open_input

#: safetensors dtype tag -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _tag, _name, _size in (("F8_E4M3", "float8_e4m3fn", 1), ("F8_E5M2", "float8_e5m2", 1),
                           ("U16", "uint16", 2), ("U32", "uint32", 4), ("U64", "uint64", 8)):
    if hasattr(torch, _name):
        DTYPES[_tag] = (getattr(torch, _name), _size)

#: the Rust library refuses headers above 100 MB; so do we (before allocating anything)
MAX_HEADER_BYTES = 100_000_000


def _limit(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


#: limits no real adapter comes near (the largest LyCORIS/FLUX files hold ~15,000 tensors; the largest
#: tensor, a PEFT ``modules_to_save`` embedding of a big LLM, ~4 GB); each is named in its error with the
#: environment variable that raises it
MAX_TENSORS = _limit("LORA_MERGE_MAX_TENSORS", 50_000)
MAX_TENSOR_BYTES = _limit("LORA_MERGE_MAX_TENSOR_BYTES", 16 * 2**30)


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads`` hook: a key given twice is an error (JSON keeps the last silently)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return out


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


class CheckedHandle(_SafetensorsHandle):
    """A shared lazy handle whose read errors (file changed or vanished) become ``FormatError``."""

    def get(self, key: str) -> torch.Tensor:
        try:
            return super().get(key)
        except FormatError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors' Rust errors, OSError: all mean "bad file"
            raise FormatError(f"cannot read tensor {key!r}: {_one_line(e)}", self.path) from None


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a safetensors header; raise :class:`FormatError` on anything malformed."""
    path = Path(path)
    try:
        with open_input(path) as f:  # a regular file only: a FIFO or a device would block or never end
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise FormatError(f"not a safetensors file: only {size} bytes (truncated?)", path)
            (n,) = struct.unpack("<Q", f.read(8))
            if n == 0 or n > MAX_HEADER_BYTES:
                raise FormatError(f"not a safetensors file: implausible header length {n}", path)
            if n > size - 8:
                raise FormatError(
                    f"truncated or not a safetensors file: header claims {n} bytes but the file has "
                    f"{size - 8} after the length prefix", path)
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"cannot read file: {e.strerror or e}", path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("not a safetensors file: header is not UTF-8 text", path) from None
    if not text.lstrip().startswith("{"):
        raise FormatError("not a safetensors file: header is not a JSON object", path)
    try:
        obj = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except DuplicateKey as e:
        raise FormatError(f"bad safetensors header: key {quoted(e.key)} appears twice", path) from None
    except (json.JSONDecodeError, RecursionError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise FormatError(f"bad safetensors header JSON: {msg}", path) from None
    if not isinstance(obj, dict):
        raise FormatError("bad safetensors header: not a JSON object", path)
    if len(obj) - ("__metadata__" in obj) > MAX_TENSORS:
        raise FormatError(f"header lists {len(obj) - ('__metadata__' in obj):,} tensors, more than the limit of {MAX_TENSORS:,} (no real "
                          "adapter has that many; raise it with LORA_MERGE_MAX_TENSORS=N)", path)
    data_len = size - 8 - n
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError("bad safetensors header: __metadata__ must map strings to strings", path)
    tensors: dict[str, TensorInfo] = {}
    for key, info in obj.items():
        tensors[key] = _tensor_info(path, key, info, data_len)
    _check_layout(path, tensors, data_len)
    return Header(path=path, tensors=tensors, metadata=dict(metadata), data_start=8 + n)


def _is_dim(s) -> bool:
    return isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**62


def _tensor_info(path: Path, key: str, info, data_len: int) -> TensorInfo:
    k = quoted(key)
    if not isinstance(info, dict):
        raise FormatError(f"bad safetensors header: entry {k} is not an object", path)
    tag, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(tag, str) or tag not in DTYPES:
        raise FormatError(f"tensor {k} has unknown dtype {quoted(tag, 40)}", path)
    if not isinstance(shape, list) or not all(_is_dim(s) for s in shape):
        raise FormatError(f"tensor {k} has an invalid shape {quoted(shape, 60)}", path)
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise FormatError(f"tensor {k} has invalid data_offsets {quoted(offs, 60)}", path)
    begin, end = offs
    if not 0 <= begin <= end:
        raise FormatError(f"tensor {k} has invalid data_offsets {quoted(offs, 60)}", path)
    if end > data_len:
        raise FormatError(
            f"tensor {k} lies outside the file (bytes {begin}..{end} of a {data_len}-byte data section; "
            "truncated?)", path)
    dtype, itemsize = DTYPES[tag]
    if math.prod(shape) * itemsize > MAX_TENSOR_BYTES:
        raise FormatError(
            f"tensor {k} declares {math.prod(shape) * itemsize:,} bytes, more than the limit of "
            f"{MAX_TENSOR_BYTES:,} (no LoRA tensor is that large; raise it with LORA_MERGE_MAX_TENSOR_BYTES=N)",
            path)
    if math.prod(shape) * itemsize != end - begin:
        raise FormatError(
            f"tensor {k}: shape {shape} of {tag} needs {math.prod(shape) * itemsize} bytes but its "
            f"offsets span {end - begin}", path)
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """Tensors must tile the data section exactly (what the Rust library enforces)."""
    pos = 0
    for key, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != pos:
            raise FormatError(
                f"bad safetensors layout: tensor {quoted(key)} starts at byte {t.begin}, expected {pos}", path)
        pos = t.end
    if pos != data_len:
        raise FormatError(
            f"bad safetensors layout: tensors cover {pos} bytes but the data section has {data_len} "
            f"({'truncated' if pos > data_len else 'trailing bytes'})", path)


#: single-number tensors (kohya alphas) are read eagerly with one ``pread`` each: going through
#: ``safe_open().get_tensor`` costs ~0.15 ms per call, which dominated reading kohya files

def lazy_refs(header: Header) -> dict[str, TensorRef]:
    """One :class:`TensorRef` per tensor, sharing one lazy handle for the file; scalars in memory."""
    start = header.data_start
    layout = {k: (t.dtype, t.shape, start + t.begin, start + t.end) for k, t in header.tensors.items()}
    handle = CheckedHandle(header.path, layout)
    refs: dict[str, TensorRef] = {}
    small = {k: t for k, t in header.tensors.items() if math.prod(t.shape) == 1 and t.end > t.begin}
    if small:
        try:
            fd = os.open(header.path, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"cannot read: {_one_line(e)}", header.path) from None
        try:
            for k, t in small.items():
                raw = os.pread(fd, t.end - t.begin, header.data_start + t.begin)
                if len(raw) != t.end - t.begin:
                    raise FormatError(f"tensor {k}: file ends inside its data", header.path)
                value = torch.frombuffer(bytearray(raw), dtype=t.dtype).reshape(t.shape)
                refs[k] = TensorRef(shape=t.shape, dtype=t.dtype, key=k, tensor=value)
        finally:
            os.close(fd)
    for k, t in header.tensors.items():
        if k not in refs:
            refs[k] = TensorRef.in_file(handle, k, t.shape, t.dtype)
    return {k: refs[k] for k in header.tensors}


_TAG_OF = {dt: tag for tag, (dt, _size) in DTYPES.items()}


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str], fh) -> None:
    """Write the safetensors format deterministically: same tensors + metadata → same bytes.

    ``safetensors.torch.save_file`` stores ``__metadata__`` from a hash map, so identical merges
    could differ byte for byte.  Layout as the reference writer: tensors ordered by (alignment
    descending, name), header JSON padded with spaces to 8 bytes.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for k in order:
        t = tensors[k]
        if t.dtype not in _TAG_OF:
            raise FormatError(f"cannot store dtype {t.dtype} in safetensors (tensor {k})")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _TAG_OF[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for k in order:
        t = tensors[k]
        if t.numel():
            fh.write(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself, no copy


def write_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors file through :func:`lora_merge.files.atomic_write` (a temp file in the same
    folder, renamed into place; nothing is left behind on failure)."""
    ready = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    md = dict(metadata)
    return atomic_write(path, lambda fh: _serialize(ready, md, fh))
