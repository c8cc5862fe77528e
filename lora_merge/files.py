"""Writing files safely, in one place: every file lora-merge writes goes through :func:`atomic_write`,
and every "may I write here?" question through :func:`refuse_existing`.

- ``atomic_write(path, write_fn)``: ``write_fn`` fills a temporary file created in the target's folder
  (so the final rename stays on one file system); the file gets the usual mode bits (umask applied, not
  ``mkstemp``'s 0600) and is renamed over ``path`` only when ``write_fn`` returned.  On any failure or
  interrupt the temporary file is removed and ``path`` is untouched.
- ``refuse_existing(path, force, inputs)``: one exception, one message.  An input (after resolving links
  and ``..``) is refused even with ``force``; an existing path is refused without it; anything that is
  not a regular file (a device, FIFO, socket or folder, also behind a link) or a path with a trailing
  ``/`` is refused even with ``force`` (``atomic_write`` checks the same again right before its rename).
- ``output_transaction()``: every :func:`atomic_write` inside it keeps its temporary file until the
  outermost transaction ends; then all are renamed into place together (an interrupt that arrives during
  the renames is held until they are done), or, on any exception or interrupt, all are removed along with
  the folders the transaction created.  A merge's adapter, sidecars and report appear together or not
  at all.
- ``check_output_folder(path)``: the folder a file will be written in exists, is a folder and is
  writable (one-line :class:`UsageError` otherwise), checked before any work.
- ``open_input(path)``: opens a regular file for reading and nothing else (a FIFO or a device would
  block or never end).
- ``note_interrupt()`` / ``interrupted()``: the CLI's signal handler records SIGINT/SIGTERM here, so an
  interrupt that some C code swallowed still stops the run (:func:`check_interrupt`) and a transaction
  never commits after one.
- ``DTYPES`` / ``parse_dtype``: the one table of dtype names the CLI, recipes and the API accept.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from .errors import FormatError, Interrupted, OutputExistsError, UsageError

__all__ = [
    "DTYPES",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "check_interrupt",
    "check_output_folder",
    "clear_interrupt",
    "dtype_name",
    "input_sha256",
    "interrupted",
    "make_dirs",
    "note_interrupt",
    "open_input",
    "output_transaction",
    "outputs_committed",
    "parse_dtype",
    "refuse_existing",
]

#: dtype names accepted everywhere (``--dtype``, recipes, ``merge(dtype=…)``)
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "f32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``'fp16'``, ``'bfloat16'``, ``torch.float32`` … → a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.float16`` → ``'float16'`` (the spelling recipes record)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- interrupts

_INTERRUPT = threading.Event()


def note_interrupt() -> None:
    """Record that the process was asked to stop (the CLI's SIGINT/SIGTERM handler calls this)."""
    _INTERRUPT.set()


def interrupted() -> bool:
    return _INTERRUPT.is_set()


def clear_interrupt() -> None:
    _INTERRUPT.clear()


def check_interrupt() -> None:
    """Raise :class:`~lora_merge.errors.Interrupted` if an interrupt was recorded (one that C code
    swallowed, too)."""
    if _INTERRUPT.is_set():
        raise Interrupted


# ---------------------------------------------------------------- transactions


class _Transaction:
    def __init__(self) -> None:
        self.pending: list[tuple[str, Path]] = []  # (temporary file, final path), in write order
        self.created: list[Path] = []  # folders this transaction made (outermost first)

    def rollback(self) -> None:
        for tmp, _ in self.pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.pending.clear()
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: never a folder that holds something else
        self.created.clear()

    def commit(self) -> None:
        global _COMMITTED
        check_interrupt()  # an interrupt some C code swallowed still means: write nothing
        with _signals_held(redeliver=False):  # a signal during the renames is too late: the work is done
            for i, (tmp, final) in enumerate(self.pending):
                try:
                    os.replace(tmp, final)
                except OSError as e:
                    self.pending = self.pending[i:]
                    raise UsageError(f"cannot write: {e.strerror or e}", final) from None
            self.pending.clear()
            self.created.clear()
            _COMMITTED = True  # before the handlers come back: a signal from now on finds the work done


_TXN: _Transaction | None = None
_TXN_LOCK = threading.Lock()
_COMMITTED = False  # the last outermost transaction renamed its files into place


def outputs_committed() -> bool:
    """Whether the last outermost :func:`output_transaction` has put its files in place (an interrupt
    after that point is too late to undo the command; the CLI's handler then ignores it)."""
    return _COMMITTED


@contextlib.contextmanager
def output_transaction() -> Iterator[None]:
    """Everything :func:`atomic_write` writes inside appears at the end, together, or not at all (nested
    transactions join the outermost one)."""
    global _TXN, _COMMITTED
    with _TXN_LOCK:
        outer = _TXN is None
        if outer:
            _TXN = _Transaction()
            _COMMITTED = False
        txn = _TXN
    if not outer:
        yield
        return
    try:
        yield
        txn.commit()
    except BaseException:
        txn.rollback()
        raise
    finally:
        with _TXN_LOCK:
            _TXN = None


@contextlib.contextmanager
def _signals_held(redeliver: bool = True) -> Iterator[None]:
    """Hold SIGINT/SIGTERM while renames run (only the main thread can swap handlers).  With
    ``redeliver`` a signal that came meanwhile is raised again once they are done; without, it is
    dropped (the caller has finished its work)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
        except (ValueError, OSError):  # pragma: no cover - not the main interpreter
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            if handler is not None:  # None: installed outside Python; leave ours (it only records)
                signal.signal(sig, handler)
        if redeliver:
            for sig in dict.fromkeys(held):
                signal.raise_signal(sig)


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; inside a transaction, the folders it creates are removed again on rollback
    (when empty)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create folder: {e.strerror or e}", path) from None
    txn = _TXN
    if txn is not None:
        txn.created.extend(reversed(missing))
    return path


def check_output_folder(path: str | os.PathLike, *, create: bool = False) -> None:
    """Raise a one-line :class:`UsageError` unless ``path`` can be written: its folder exists (with
    ``create``, the nearest existing ancestor, for folders we will create), is a folder and is writable;
    ``path`` itself is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError("is a folder; give a file path", path)
    folder = path.parent
    if create:
        while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
            folder = folder.parent
    if not folder.exists():
        raise UsageError(f"folder {folder} does not exist", path)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder", path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"folder {folder} is not writable", path)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], Any], *, mode: str = "wb") -> Path:
    """Write ``path`` through ``write_fn(fh)`` on a temporary file in the same folder, then rename it (at
    the end of the enclosing :func:`output_transaction`, if any)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"folder {path.parent} does not exist", path)
    if path.is_dir():
        raise OutputExistsError("is a folder; give a file path", path)
    refuse_special(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UsageError(f"cannot write in folder {path.parent}: {e.strerror or e}", path) from None
    txn = _TXN
    try:
        try:
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
                write_fn(fh)
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG):
                raise UsageError(f"cannot write: {e.strerror}", path) from None
            raise
        if txn is not None:
            txn.pending.append((tmp, path))
        else:
            with _signals_held():
                refuse_special(path)  # nothing turned into a device or FIFO while we wrote
                os.replace(tmp, path)
    except BaseException:
        if txn is None or (tmp, path) not in txn.pending:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """JSON with a trailing newline (``default=str`` for paths and dtypes)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def _resolved(paths: Iterable[str | os.PathLike | None]) -> list[Path]:
    return [Path(p).resolve() for p in paths if p is not None]


def file_kind(mode: int) -> str:
    """What a ``stat`` mode describes, for messages: ``a folder``, ``a FIFO``, ``a device``, …"""
    return ("a regular file" if stat.S_ISREG(mode) else "a folder" if stat.S_ISDIR(mode) else "a FIFO"
            if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "not a regular file")  # fmt: skip


def refuse_special(path: str | os.PathLike, *, folder: bool = False) -> None:
    """Raise :class:`OutputExistsError` if ``path`` exists and is not what we may replace — a regular file
    (a folder, with ``folder``) — also behind a symbolic link: never a device, FIFO or socket, ``--force``
    or not.  A trailing ``/`` on a file path is refused too (it names a folder)."""
    text = os.fspath(path)
    if not folder and text.endswith(("/", os.sep)) and text.strip("/" + os.sep):
        raise OutputExistsError("ends with '/', which names a folder; give a file path", text)
    for follow in (False, True):
        try:
            st = os.stat(text, follow_symlinks=follow)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            raise OutputExistsError(f"cannot check the output path: {e.strerror or e}", text) from None
        if not follow and stat.S_ISLNK(st.st_mode):
            continue  # judge the link's target
        ok = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
        if not ok:
            raise OutputExistsError(f"is {file_kind(st.st_mode)}, not a {'folder' if folder else 'regular file'}; "
                                    "refusing to write over it (even with --force)", text)
        return


def refuse_existing(
    path: str | os.PathLike, force: bool = False, inputs: Iterable[str | os.PathLike | None] = (),
    *, folder: bool = False,
) -> None:
    """Raise :class:`OutputExistsError` if writing ``path`` would overwrite an input (even with ``force``:
    the path itself, a file inside an input folder, or a folder that holds an input), anything but a
    regular file (a folder, with ``folder``; even with ``force``, see :func:`refuse_special`) or an
    existing path (without ``force``)."""
    refuse_special(path, folder=folder)
    out = Path(path)
    target = out.resolve()
    for src in _resolved(inputs):
        if target == src or (src.is_dir() and src in target.parents) or (target.is_dir() and target in src.parents):
            raise OutputExistsError("refusing to write over an input (even with --force)", out)
    if not force and (out.exists() or out.is_symlink()):
        raise OutputExistsError("exists; pass --force to overwrite it", out)


def open_input(path: str | os.PathLike) -> IO[bytes]:
    """Open ``path`` for reading if it is a regular file; a FIFO, socket or device is a
    :class:`FormatError` (opened without blocking, checked with ``fstat`` before any read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FormatError(f"cannot read file: {e.strerror or e}", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"not a regular file ({file_kind(st.st_mode)}); refusing to read it", path)
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _hash_file(path: Path) -> str:
    """sha256 of a file, hashed from a read-only mapping (no copies; 13% less CPU than chunked reads,
    ``python benchmarks/refactor_facts.py hashing``)."""
    h = hashlib.sha256()
    with open_input(path) as f:
        if os.fstat(f.fileno()).st_size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            h.update(m)
    return h.hexdigest()


def input_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of an input file; for a PEFT folder, of its ``adapter_model.safetensors`` (or ``.bin``)."""
    p = Path(path)
    if p.is_dir():
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if (p / name).is_file():
                return _hash_file(p / name)
        return None
    return _hash_file(p) if p.is_file() else None
