"""The dialect registry: what a LoRA dialect is (:class:`Dialect`), the registered ones, and detection.

A dialect is one object with a ``name`` and four verbs: ``claims(key)`` (does this tensor key belong to
me?), ``locate(path)`` (does this path have my on-disk layout, e.g. a PEFT folder?), ``read(...)`` and
``write(...) -> Written``.  The built-ins (kohya, diffusers, PEFT) register themselves in
``lora_merge/formats/__init__.py``; another dialect (LyCORIS, OneTrainer, …) is one module with one
object and one :func:`register_dialect` call.  :mod:`lora_merge.formats.api` loops over the registry;
it never names a dialect.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..adapter import Adapter, TensorRef
from ..errors import FormatError, UsageError

__all__ = [
    "Dialect",
    "Located",
    "Written",
    "detect_dialect",
    "dialects",
    "get_dialect",
    "register_dialect",
    "registered",
]


@dataclass
class Written:
    """What a dialect's ``write`` produces: the tensors and metadata of its safetensors file, and for a
    folder dialect the other files of the folder (``{file name: text}``, e.g. PEFT's
    ``adapter_config.json``)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Located:
    """A path a dialect recognised by its layout: the tensor file to read, the parsed config (or None),
    and whether the layout alone decides the dialect (``certain``; otherwise the keys are voted on)."""

    weights: Path
    config: dict | None = None
    certain: bool = True


@runtime_checkable
class Dialect(Protocol):
    #: what ``format=``/``to=`` and ``--format``/``--to`` accept
    name: str
    #: how messages name it ("PEFT")
    label: str
    #: detection order: a key counts for the lowest-``precedence`` dialect that claims it
    precedence: int
    #: () for a single ``.safetensors`` file; for a folder dialect the names of the files the folder
    #: holds, the tensor file first (the rest come from ``Written.files``)
    folder_files: tuple[str, ...]
    #: whether the dialect can hold non-LoRA tensors (PEFT ``modules_to_save``)
    keeps_extra_tensors: bool

    def claims(self, key: str) -> bool:
        """Whether tensor ``key`` is written in this dialect (one vote in :func:`detect_dialect`)."""
        ...

    def locate(self, path: Path) -> Located | None:
        """A :class:`Located` when ``path`` has this dialect's layout (then it is read as this dialect),
        else None.  May raise :class:`FormatError` for a path that has the layout but is broken."""
        ...

    def read(self, refs: dict[str, TensorRef], metadata: dict[str, str], path: Path,
             config: dict | None) -> Adapter:
        """An :class:`Adapter` from lazy tensor refs, the file's metadata and the config :meth:`locate`
        found (None when there was none)."""
        ...

    def write(self, adapter: Adapter, dtype: torch.dtype | None, metadata: dict[str, str]) -> Written:
        """The adapter's tensors (cast to ``dtype`` unless None), metadata and extra files."""
        ...


@dataclass(frozen=True)
class FileDialect:
    """A :class:`Dialect` of single ``.safetensors`` files made from three functions: ``claims(key)``,
    ``reader(refs, metadata, path)`` and ``writer(adapter, dtype, metadata) -> Written``."""

    name: str
    label: str
    precedence: int
    claimer: Callable[[str], bool]
    reader: Callable[[dict[str, TensorRef], dict[str, str], Path], Adapter]
    writer: Callable[[Adapter, torch.dtype | None, dict[str, str]], Written]
    folder_files: tuple[str, ...] = ()
    keeps_extra_tensors: bool = False

    def claims(self, key: str) -> bool:
        return self.claimer(key)

    def locate(self, path: Path) -> Located | None:
        return None

    def read(self, refs: dict[str, TensorRef], metadata: dict[str, str], path: Path,
             config: dict | None = None) -> Adapter:
        return self.reader(refs, metadata, path)

    def write(self, adapter: Adapter, dtype: torch.dtype | None, metadata: dict[str, str]) -> Written:
        return self.writer(adapter, dtype, metadata)


_REGISTRY: dict[str, Dialect] = {}


def register_dialect(dialect: Dialect, *, replace: bool = False) -> Dialect:
    """Add ``dialect`` to the registry (after the ones already there; ties in detection go to the first
    registered).  Refuses a second dialect of the same name unless ``replace``."""
    if not isinstance(dialect, Dialect):
        raise TypeError(f"{dialect!r} does not implement the Dialect protocol")
    if dialect.name in _REGISTRY and not replace:
        raise ValueError(f"a dialect named {dialect.name!r} is already registered")
    _REGISTRY[dialect.name] = dialect
    return dialect


def dialects() -> tuple[str, ...]:
    """Names of the registered dialects, in registration order (``("kohya", "diffusers", "peft")``)."""
    return tuple(_REGISTRY)


def registered() -> tuple[Dialect, ...]:
    """The registered dialect objects, in registration order."""
    return tuple(_REGISTRY.values())


def get_dialect(name: str, *, what: str = "format") -> Dialect:
    """The dialect called ``name``; :class:`UsageError` (``unknown <what> …``) listing the choices."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UsageError(f"unknown {what} {name!r} (choose from {', '.join(_REGISTRY)})") from None


def _labels(ds: Iterable[Dialect]) -> str:
    labels = [d.label for d in ds]
    return " or ".join(labels) if len(labels) < 3 else f"{', '.join(labels[:-1])} or {labels[-1]}"


def detect_dialect(keys, metadata: dict[str, str] | None = None) -> str:
    """The dialect most keys are written in.  Each key votes for the dialect of lowest ``precedence``
    that claims it; ties go to the first registered.

    Raises :class:`FormatError` when no key fits any dialect."""
    ds = registered()
    by_precedence = sorted(ds, key=lambda d: d.precedence)
    votes = {d.name: 0 for d in ds}
    for key in keys:
        for d in by_precedence:
            if d.claims(key):
                votes[d.name] += 1
                break
    best = max(votes, key=votes.__getitem__) if votes else None
    if best is None or votes[best] == 0:
        raise FormatError(f"no LoRA keys found (not a {_labels(ds)} LoRA file)")
    return best
