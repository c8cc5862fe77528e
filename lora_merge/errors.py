"""Errors a user can cause. The CLI prints them as one line and exits non-zero, with no traceback."""
from __future__ import annotations

import os


def quoted(name: object, limit: int = 120) -> str:
    """``repr(name)`` for a message, cut to ``limit`` characters: a header may hold a 10 MB key, and an
    error line should not echo it whole."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(str(name)):,} characters)"


class LoraMergeError(Exception):
    """Base class for user-facing errors. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class FormatError(LoraMergeError):
    """The file is not a LoRA we can read (malformed, unsupported adapter type, pickle refused)."""

    exit_code = 2


class UnsupportedAdapterError(FormatError):
    """The file is an adapter, but not a plain LoRA (LoHa, LoKr, DoRA, OFT, IA3, ...)."""


class MergeError(LoraMergeError):
    """Inputs cannot be merged as asked (shape conflicts, conflicting heads, bad weights)."""

    exit_code = 3


class OutputExistsError(LoraMergeError):
    """Refusing to overwrite an existing output (or an input) without --force."""

    exit_code = 4


class UsageError(LoraMergeError):
    """Bad option values, bad recipe files, unknown strategies."""

    exit_code = 2


class NotMainProcess(LoraMergeError):
    """A secondary process of a multi-process (accelerate) run: it helped train and now stops quietly,
    leaving the output to the main process.  The CLI exits 0 without a message."""

    exit_code = 0


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised by the CLI's signal handler.  A ``BaseException`` like
    ``KeyboardInterrupt`` (so ``except Exception`` never eats it and every cleanup runs), but not one: click
    turns a ``KeyboardInterrupt`` into its ``Abort``, with an extra blank line."""


class PartialReadWarning(UserWarning):
    """Some keys of a file could not be parsed and were skipped."""


class MissingModuleWarning(UserWarning):
    """A module present in one input is absent from another; it is treated as a zero update."""
