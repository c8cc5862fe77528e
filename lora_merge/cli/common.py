"""Shared click helpers for ``lora-merge`` sub-commands.

Output policy (keep it the same in every command):

- **stdout** carries the result: rich tables for people, or exactly one JSON document with ``--json``
  (nothing else is printed on stdout then, so ``lora-merge x --json | jq`` always works);
- **stderr** carries everything else: progress bars, status lines, ``warning: ...`` and ``error: ...``.

Errors are raised as :mod:`lora_merge.errors` exceptions; ``lora_merge.cli.main`` prints them as one line
and exits with their code.  Options:

- :func:`format_option` (``--format``), :func:`strict_option` (``--strict``),
  :func:`allow_pickle_option` (``--allow-pickle``), :func:`json_option` (``--json``) are decorators;
- :func:`load_adapter` calls :func:`lora_merge.load` with those options;
- :func:`print_json` prints one JSON document (inf/nan become ``null``);
- :func:`stdout_console` / :func:`stderr_console` and :func:`progress` for rich output.

Option conventions (``tests/test_cli_conventions.py`` walks every command and checks them):

- the output a command writes is ``-o/--output`` (:func:`output_option`); a second, secondary output has
  its own name, listed in :data:`SECONDARY_OUTPUTS` (``merge --report``, ``priors measure --plot``, …);
- a closed set of values is a :class:`click.Choice` (``--to`` lists only the dialects that can be written,
  ``--dtype`` is :data:`DTYPE_CHOICES`); the open registries (strategies, architectures, which plug-ins
  extend, and torch devices) are free text, listed in :data:`OPEN_SETS`;
- every option that takes a value shows its default: ``show_default=True``, or ``(default: …)`` in its help;
- a model *folder* is ``--base MODEL_DIR``; a weights *file* is ``--base-weights FILE``;
- the default stored dtype is one rule (:func:`default_dtype`): the inputs' dtype when all their tensors
  share one, else fp32.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import UsageError

T = TypeVar("T")

#: ``--dtype`` spellings (:func:`lora_merge.files.parse_dtype` turns them into torch dtypes)
DTYPE_CHOICES = ("fp32", "fp16", "bf16")

#: options that write a second output next to the command's ``-o/--output`` (or a log or a cache), and so
#: have their own names
SECONDARY_OUTPUTS = frozenset({"--report", "--plot", "--log", "--cache"})

#: options whose values come from open registries (plug-ins add strategies and families) or are torch device
#: strings (``cuda:1``): free text, checked by the API with a message that lists the known values
OPEN_SETS = frozenset({"--strategy", "--strategies", "--arch", "--device", "--pairs", "--only", "--pair"})


class DialectChoice(click.Choice):
    """``--format``/``--to``: the names of the registered dialects (:func:`lora_merge.formats.dialects`),
    looked up when first needed so that importing a command does not import torch.  ``writable``: only the
    dialects that can be written (``--to``; LyCORIS and XLabs are read only)."""

    def __init__(self, *, writable: bool = False) -> None:
        self.writable = writable
        super().__init__((), case_sensitive=False)

    @property
    def choices(self) -> tuple[str, ...]:
        from ..formats import registered

        return tuple(d.name for d in registered() if not self.writable or getattr(d, "writable", True))

    @choices.setter
    def choices(self, _value) -> None:  # click.Choice.__init__ assigns it
        pass


format_option = click.option(
    "--format",
    "fmt",
    type=DialectChoice(),
    default=None,
    help="Read the input as this dialect (default: detected from the file).",
)


def output_option(help: str, **kw: Any):
    """``-o/--output PATH``: the one spelling of a command's output (``extra`` spellings stay accepted,
    e.g. a command's older ``--out``)."""
    extra = kw.pop("extra", ())
    return click.option("-o", "--output", *extra, "output", type=kw.pop("type", click.Path()), help=help, **kw)


#: the other spellings :data:`lora_merge.files.DTYPES` accepts (recipes, ``merge(dtype=…)``), for ``--dtype`` too
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "f32": "fp32", "float16": "fp16", "half": "fp16",
                 "f16": "fp16", "bfloat16": "bf16"}


class DtypeChoice(click.Choice):
    """:data:`DTYPE_CHOICES`, the help's list; the spellings of :data:`DTYPE_ALIASES` are taken too."""

    def __init__(self) -> None:
        super().__init__(DTYPE_CHOICES, case_sensitive=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str):
            value = DTYPE_ALIASES.get(value.lower(), value)
        return super().convert(value, param, ctx)


def dtype_option(help: str, **kw: Any):
    """``--dtype [fp32|fp16|bf16]``."""
    return click.option("--dtype", type=DtypeChoice(), help=help, **kw)


repair_option = click.option(
    "--repair",
    is_flag=True,
    help="Rename the keys of a known broken layout first (lora_unet_unet_…_lora_down.weight, the common "
    "broken kohya conversion); the tensors are unchanged.",
)


def base_weights_option(help: str):
    """``--base-weights FILE``: the base model's weights, one ``.safetensors`` file (not a model folder)."""
    return click.option("--base-weights", type=click.Path(exists=True, dir_okay=False), default=None,
                        metavar="FILE", help=help)


def storage_dtype(adapters) -> Any:
    """The one torch dtype all the adapters' floating tensors are stored in (LoRA factors, bias deltas and
    modules_to_save tensors), or None when they differ.  LyCORIS and DoRA modules count with the dtype of
    the factors they are read as (fp32: computed from several tensors)."""
    dtypes = set()
    for ad in adapters:
        for m in ad:
            dtypes.update(t.dtype for t in (m.down, m.up, getattr(m, "bias", None)) if t is not None)
        dtypes.update(t.dtype for t in ad.extra_tensors.values())
    floating = {d for d in dtypes if d.is_floating_point}
    return floating.pop() if len(floating) == 1 else None


def default_dtype(adapters) -> str:
    """The default ``--dtype`` of ``merge`` and ``convert``: the inputs' storage dtype when all their tensors
    share one (:func:`storage_dtype`) and it is one of :data:`DTYPE_CHOICES`, else fp32."""
    from ..files import DTYPES

    dtype = storage_dtype(adapters)
    return next((name for name in DTYPE_CHOICES if DTYPES[name] == dtype), "fp32")


#: the default ``--dtype`` rule (:func:`default_dtype`) as the help texts say it
DTYPE_RULE = "default: the inputs' when all their tensors share one, else fp32"

strict_option = click.option(
    "--strict",
    is_flag=True,
    help="Fail on keys that cannot be parsed (default: warn and skip them).",
)

allow_pickle_option = click.option(
    "--allow-pickle",
    is_flag=True,
    help="UNSAFE: also read pickle files (.bin, .pt, .pth, .ckpt) with torch.load(weights_only=True); "
    "trusted files only.",
)

json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON document on stdout instead of tables.",
)


def load_adapter(path: str | os.PathLike, *, fmt: str | None = None, strict: bool = False,
                 allow_pickle: bool = False, repair: bool = False):
    """``lora_merge.load`` with the CLI options (imported lazily: torch is heavy)."""
    import lora_merge

    extra = {"repair": True} if repair else {}
    return lora_merge.load(Path(path), format=fmt, strict=strict, allow_pickle=allow_pickle, **extra)


def _jsonable(obj: Any) -> Any:
    """Make ``obj`` strict JSON: inf/nan → None, paths and dtypes → strings, tuples/sets → lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def to_json(obj: Any) -> str:
    return json.dumps(_jsonable(obj), indent=2, allow_nan=False)


def print_json(obj: Any) -> None:
    """Print ``obj`` as one strict JSON document on stdout."""
    click.echo(to_json(obj))


def stdout_console():
    """Rich console for results (tables) on stdout; 160 columns wide when piped (no terminal to fit)."""
    import shutil

    from rich.console import Console

    console = Console(soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = max(shutil.get_terminal_size((160, 24)).columns, 160)
    return console


def stderr_console():
    """Rich console for progress and status on stderr."""
    from rich.console import Console

    return Console(stderr=True)


def progress(description: str) -> Callable[[Iterable[T]], Iterable[T]]:
    """A wrapper that shows a transient rich progress bar on stderr while iterating (silent when
    stderr is not a terminal)."""
    from rich.progress import track

    def wrap(items: Iterable[T]) -> Iterable[T]:
        items = list(items)
        console = stderr_console()
        return track(items, description=description, console=console, transient=True,
                     disable=len(items) < 2 or not console.is_terminal)

    return wrap


# ---- small formatters for tables ----

def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def fmt_num(x: Any, digits: int = 4) -> str:
    """Compact number: ints as is, floats to ``digits`` significant digits, None/inf readable."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}g}"
    return str(x)


def shorten(text: str, width: int = 80) -> str:
    text = str(text).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def add_columns(table, columns, *, name_width: int = 0) -> None:
    """Add columns to a rich table: the first is a (long) name, the rest right-aligned numbers.

    ``name_width`` is the longest name; the name column keeps up to 24 characters of it before folding.
    """
    for i, col in enumerate(columns):
        if i == 0:
            table.add_column(col, overflow="fold", min_width=min(max(name_width, len(col)), 24))
        else:
            table.add_column(col, justify="right", overflow="fold")



def threads_option(f):
    """``--threads N`` (default 1) for commands that run the tiny toy-world model: its layers are so small
    that extra torch threads only add synchronisation cost (measured: one 16 px UNet forward took 57 ms on
    1 thread and 1.4 s on 2 threads of a busy 2-core machine)."""

    def _apply(ctx, param, value):
        import torch

        torch.set_num_threads(value)
        return value

    return click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
                        expose_value=False, callback=_apply, is_eager=False,
                        help="torch CPU threads for sampling.")(f)


def check_file_path_text(text: str | os.PathLike, to: str | None) -> None:
    """An output path typed with a trailing ``/`` names a folder: only a PEFT adapter (``--to peft``) is
    one, so anywhere else it is a usage error rather than a slash silently dropped."""
    raw = os.fspath(text)
    if raw.endswith(("/", os.sep)) and raw.strip("/" + os.sep) and (to or "").lower() != "peft":
        raise UsageError(f"{raw}: ends with '/', which names a folder; give a file path (only --to peft "
                         "writes a folder)")
