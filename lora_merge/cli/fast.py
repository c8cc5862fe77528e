"""Answers that need no torch: ``lora-merge --version``, ``--help`` and ``strategies [NAME] [--json]``.

Importing a command module or the strategy registry imports torch (about 2 s).  These three answers are
printed from ``lora_merge/data/cli_catalogue.json`` instead: every command's help text, every built-in
strategy's ``describe()`` and every built-in sampling-time merger's ``describe()`` (both generated from
their ``Param`` declarations), written from the live objects by ``python -c "from lora_merge.cli import
COMMANDS; from lora_merge.cli.fast import write_catalogue; write_catalogue(COMMANDS)"`` and checked against
them by ``tests/test_cli_fast.py`` (a stale catalogue fails the suite).  When a plug-in is installed (the
``lora_merge.strategies`` or ``lora_merge.sampling_time`` entry-point group) or a registry is already
imported (a strategy or merger registered in-process), ``strategies`` takes the normal path.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from .._version import __version__
from ..plugins import resolve

__all__ = ["answer", "live_catalogue", "load_catalogue", "write_catalogue"]

CATALOGUE_PATH = Path(__file__).resolve().parent.parent / "data" / "cli_catalogue.json"


@functools.cache
def load_catalogue() -> dict[str, Any]:
    """The generated catalogue (package data)."""
    return json.loads(CATALOGUE_PATH.read_text(encoding="utf-8"))


_catalogue = load_catalogue


def _group_help(cli: click.Group) -> str:
    cat = _catalogue()["commands"]
    group = click.Group(name="lora-merge", help=cli.help, params=list(cli.params),
                        context_settings=dict(cli.context_settings))
    for name, info in cat.items():
        group.add_command(click.Command(name, help=info["help"], short_help=info["short_help"]))
    ctx = click.Context(group, info_name="lora-merge", **group.context_settings)
    return group.get_help(ctx)


#: the registries ``strategies`` lists and their entry-point groups (plug-ins only the live registry knows)
_REGISTRIES = ("lora_merge.strategies", "lora_merge.sampling_time")


def _strategies(rest: list[str]) -> int | None:
    if any(m in sys.modules for m in _REGISTRIES):
        return None  # the live registry may hold strategies or mergers registered in this process
    from importlib.metadata import entry_points

    if any(list(entry_points(group=g)) for g in _REGISTRIES):
        return None  # plug-ins: only the registries know them
    as_json = "--json" in rest
    sampling_time = "--sampling-time" in rest
    names = [a for a in rest if a not in ("--json", "--sampling-time")]
    if len(names) > 1 or any(a.startswith("-") for a in names):
        return None  # --help and anything unusual: click answers
    infos = _catalogue()["strategies"]
    samplers = _catalogue().get("sampling_time", [])
    from .strategies_cmd import show, show_sampling_time

    if names:
        info = next((i for i in samplers + infos if i["name"] == names[0]), None)
        if info is None:
            return None  # the registry's error message
        show(info, as_json)
    elif sampling_time:
        show_sampling_time(samplers, as_json)
    else:
        show(infos, as_json, samplers)
    return 0


def answer(argv: list[str] | None, cli: click.Group) -> int | None:
    """Print the answer and return the exit code, or None when the normal path must answer; ``cli`` is the
    ``lora-merge`` group (its help text and options)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        click.echo(f"lora-merge, version {__version__}")
        return 0
    if args in (["--help"], ["-h"]):
        click.echo(_group_help(cli))
        return 0
    if args and args[0] == "strategies":
        return _strategies(args[1:])
    return None


def live_catalogue(commands_table: dict[str, str]) -> dict[str, Any]:
    """The catalogue from the live objects (imports every command of ``commands_table``, name →
    ``"module:attribute"``, and the strategy registry)."""

    from ..sampling_time import available_sampling_time
    from ..sampling_time.registry import BUILTIN_MODULES as _BUILTIN_SAMPLING_TIME
    from ..strategies import _BUILTIN_MODULES, available_strategies

    commands = {}
    for name, target in sorted(commands_table.items()):
        cmd = resolve(target)
        commands[name] = {"help": cmd.help, "short_help": cmd.short_help}
    strategies = [cls.describe() for cls in available_strategies().values() if cls.__module__ in _BUILTIN_MODULES]
    samplers = [cls.describe() for cls in available_sampling_time().values()
                if cls.__module__ in _BUILTIN_SAMPLING_TIME]
    catalogue = {"commands": commands, "strategies": strategies, "sampling_time": samplers}
    return json.loads(json.dumps(catalogue))  # as stored: lists, not tuples


def write_catalogue(commands_table: dict[str, str]) -> None:
    """Regenerate ``lora_merge/data/cli_catalogue.json`` from the live objects."""
    from ..files import atomic_write_json

    atomic_write_json(CATALOGUE_PATH, live_catalogue(commands_table), indent=1)
