"""Errors a user can cause. The CLI prints them as one line and exits non-zero, with no traceback.

Messages are written in the command line's words (``--force``, ``--rank K``); raised from the Python API
they read in Python's (``force=True``, ``rank=K``): :func:`python_words` rewrites them unless the CLI is
running (:func:`cli_words`)."""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

#: options that are on/off flags on the command line and ``True``/``False`` keywords in Python
BOOL_OPTIONS = frozenset({
    "force", "full-rank", "allow-pickle", "allow-mixed-arch", "record-paths", "keep-heads", "strict", "repair",
    "prior-init", "dry-run", "hard", "symmetric", "closed-form",
})  # fmt: skip
#: words that follow an option in a sentence without being its value
_NOT_VALUES = frozenset(["and", "or", "with", "to", "needs", "need", "only", "is", "are", "for", "in", "on", "of", "the", "a", "an", "not", "takes", "must", "picks", "gives", "keeps", "writes", "reads", "also", "when", "if"])
_OPTION = re.compile(r"--([a-z][a-z0-9-]*)(?: ([A-Za-z0-9_.][\w.\-/]*))?")
_CLI = {"on": False}


@contextlib.contextmanager
def cli_words() -> Iterator[None]:
    """Inside, errors keep the command line's words (the CLI runs its commands in here)."""
    before = _CLI["on"]
    _CLI["on"] = True
    try:
        yield
    finally:
        _CLI["on"] = before


def python_words(message: str) -> str:
    """``--force`` → ``force=True``, ``--rank K`` → ``rank=K``, ``--to peft`` → ``to='peft'``,
    ``--base`` → ``base=...``: a message of the command line in the API's keywords (text in backticks,
    a quoted command line, is left as it is)."""

    def one(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        key = name.replace("-", "_")
        if name in BOOL_OPTIONS:
            return f"{key}=True" + (f" {value}" if value else "")
        if value is None or value.lower() in _NOT_VALUES:
            return f"{key}=..." + (f" {value}" if value else "")
        if value.isupper() or re.fullmatch(r"-?[\d.]+", value):
            return f"{key}={value}"
        return f"{key}={value!r}"

    # a command line quoted in backticks (`lora-merge convert IN OUT --repair`) stays as written
    parts = message.split("`")
    return "`".join(part if i % 2 else _OPTION.sub(one, part) for i, part in enumerate(parts))


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
        message = message if _CLI["on"] else python_words(message)
        self.message = message
        shown = self.path if self.path is None or len(self.path) <= 240 else (
            f"{self.path[:120]}…{self.path[-60:]} ({len(self.path):,} characters)")
        super().__init__(f"{shown}: {message}" if shown else message)


class FormatError(LoraMergeError):
    """The file is not a LoRA we can read (malformed, unsupported adapter type, pickle refused)."""

    exit_code = 2


class UnsupportedAdapterError(FormatError):
    """The file is an adapter, but not a plain LoRA (LoHa, LoKr, DoRA, OFT, IA3, ...)."""


class MergeError(LoraMergeError):
    """Inputs cannot be merged as asked (shape conflicts, conflicting heads, bad weights)."""

    exit_code = 3


class OutputExistsError(LoraMergeError):
    """Refusing to overwrite an existing output (or an input) without ``force`` (``--force``)."""

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
