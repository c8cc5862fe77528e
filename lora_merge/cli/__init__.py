"""The ``lora-merge`` command line: a thin layer over the Python API.

Sub-commands live in their own modules and are imported only when invoked, so ``lora-merge --help``
does not pay for importing torch.  User errors (:class:`~lora_merge.errors.LoraMergeError`) print as
one line on stderr and exit with the error's code; no traceback.

SIGINT (Ctrl-C) and SIGTERM, at any moment after start-up, end the process with one line
``interrupted`` and exit code 130, and leave no output: the files a command writes are renamed into place
together at the very end (:func:`lora_merge.files.output_transaction`), and removed if the command stops
before that.  The handler also records the signal, so an interrupt that some C code swallows still
stops the run.  A signal that arrives after the outputs are in place is too late and is ignored.
"""
from __future__ import annotations

import os
import signal
import sys
import warnings

import click

from ..errors import cli_words
from ..plugins import resolve

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
        return resolve(target)

    def invoke(self, ctx: click.Context):
        with cli_words():  # errors raised by a command say --force, not force=True (CliRunner too)
            return super().invoke(ctx)


def _format_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-merge", prog_name="lora-merge")
def cli() -> None:
    """Inspect, convert, diff and merge LoRA adapters (kohya/A1111, diffusers, PEFT)."""


#: commands whose written files all appear at the end of the command, together (or none on an error or an
#: interrupt); the others (bench, demo, toyworld, priors, calibrate) read back files they wrote, so each
#: of their files is written atomically on its own
TRANSACTIONAL = frozenset({"convert", "diff", "inspect", "merge", "strategies"})

_STATE = {"transaction": False, "signalled": False}


def _files():
    """``lora_merge.files`` if it was imported (it imports torch; the handler must not)."""
    return sys.modules.get("lora_merge.files")


def _on_signal(signum, frame) -> None:
    files = _files()  # possibly still being imported: only what it already defines
    if _STATE["transaction"] and getattr(files, "outputs_committed", lambda: False)():
        return  # the outputs are in place: too late to interrupt
    _STATE["signalled"] = True  # passed on to files.note_interrupt once it is imported
    getattr(files, "note_interrupt", lambda: None)()
    raise getattr(sys.modules.get("lora_merge.errors"), "Interrupted", KeyboardInterrupt)


def _install_handlers() -> dict:
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # not the main thread (the CLI called from a worker)
            pass
    return old


def _command_name(argv: list[str] | None) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> None:
    """The console script (``argv`` None: the process ends here, the handlers stay) or an in-process call
    (the caller's handlers come back afterwards)."""
    from .fast import answer  # --version, --help, `strategies`: answered without importing torch

    code = answer(argv, cli)
    if code is not None:
        sys.exit(code)
    _STATE["signalled"] = False
    old = _install_handlers()
    try:
        _main(argv)
    finally:
        if argv is not None:
            for sig, handler in old.items():
                if handler is not None:
                    signal.signal(sig, handler)
            _STATE["transaction"] = False


def _interrupted() -> None:
    click.echo("interrupted", err=True)
    sys.exit(130)


def _main(argv: list[str] | None) -> None:
    try:
        from ..errors import Interrupted, LoraMergeError
        from ..files import clear_interrupt, interrupted, note_interrupt, output_transaction
    except BaseException as exc:  # an interrupt while these (and torch) are imported
        # the signal may surface as another error: raised inside numpy's C import, it leaves numpy half
        # loaded and the retry fails with "ImportError: cannot load module more than once per process"
        if _STATE["signalled"] or type(exc).__name__ in ("Interrupted", "KeyboardInterrupt"):
            _interrupted()
        raise
    clear_interrupt()
    if _STATE["signalled"]:  # a signal during the imports above, swallowed by torch's C start-up code
        note_interrupt()
        _interrupted()
    warnings.formatwarning = _format_warning
    try:
        if _command_name(argv) in TRANSACTIONAL:
            _STATE["transaction"] = True
            with output_transaction():
                cli.main(args=argv, prog_name="lora-merge", standalone_mode=False)
        else:
            cli.main(args=argv, prog_name="lora-merge", standalone_mode=False)
        if interrupted() and not (_STATE["transaction"] and _files().outputs_committed()):
            raise Interrupted  # swallowed somewhere on the way; nothing was written
    except LoraMergeError as exc:
        if exc.exit_code == 0:  # NotMainProcess: a helper process of a multi-process run, done
            sys.exit(0)
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        click.echo("interrupted" if isinstance(exc.__cause__, KeyboardInterrupt) else "aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, Interrupted):
        if _STATE["transaction"] and _files().outputs_committed():
            _done(argv)
        _interrupted()
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(0)
    except OSError as exc:  # the file system said no (a name too long, a loop of links): the user's path
        name = str(exc.filename or "")
        name = name if len(name) <= 240 else f"{name[:120]}…{name[-60:]} ({len(name):,} characters)"
        click.echo(f"error: {name + ': ' if name else ''}{exc.strerror or exc}", err=True)
        sys.exit(2)
    except Exception as exc:
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(exc, torch.linalg.LinAlgError):
            raise
        # the net under every numerical path (the merge and the input models name the module themselves)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        click.echo(f"error: the linear algebra failed on the inputs' values ({first[:200]}); are they finite "
                   "and of a sane size?", err=True)
        sys.exit(3)
    _done(argv)


def _done(argv: list[str] | None) -> None:
    """Exit 0: the command finished.  As the console script (``argv`` None) the process ends here, so
    SIGINT/SIGTERM are ignored from now on — the interpreter's shutdown (hundreds of ms with torch loaded)
    resets Python-level handlers to the default, and a Ctrl-C then would kill a finished command with
    -2.  Ignored signals stay ignored through the shutdown."""
    if argv is None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (ValueError, OSError):  # not the main thread
                pass
    sys.exit(0)


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
