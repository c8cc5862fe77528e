"""The ``lora-merge`` command line: a thin layer over the Python API.

Sub-commands live in their own modules and are imported only when invoked, so ``lora-merge --help``
does not pay for importing torch.  User errors (:class:`~lora_merge.errors.LoraMergeError`) print as
one line on stderr and exit with the error's code; no traceback.
"""
from __future__ import annotations

import importlib
import sys
import warnings

import click

#: command name -> "module:attribute"; each module defines one click command
COMMANDS: dict[str, str] = {
    "calibrate": "lora_merge.cli.calibrate_cmd:calibrate_cmd",
    "inspect": "lora_merge.cli.inspect_cmd:inspect_cmd",
    "diff": "lora_merge.cli.diff_cmd:diff_cmd",
    "convert": "lora_merge.cli.convert_cmd:convert_cmd",
    "merge": "lora_merge.cli.merge_cmd:merge",
    "strategies": "lora_merge.cli.strategies_cmd:strategies",
    "toyworld": "lora_merge.cli.toyworld_cmd:toyworld",
    "demo": "lora_merge.cli.demo_cmd:demo",
    "bench": "lora_merge.cli.bench_cmd:bench",
    "priors": "lora_merge.cli.priors_cmd:priors",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        mod, attr = target.split(":")
        return getattr(importlib.import_module(mod), attr)


def _format_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-merge", prog_name="lora-merge")
def cli() -> None:
    """Inspect, convert, diff and merge LoRA adapters (kohya/A1111, diffusers, PEFT)."""


def main(argv: list[str] | None = None) -> None:
    from ..errors import LoraMergeError

    warnings.formatwarning = _format_warning
    try:
        cli.main(args=argv, prog_name="lora-merge", standalone_mode=False)
    except LoraMergeError as exc:
        if exc.exit_code == 0:  # NotMainProcess: a helper process of a multi-process run, done
            sys.exit(0)
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(0)
