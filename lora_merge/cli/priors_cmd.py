"""``lora-merge priors [ARCH]``: print a layer-priors table (which blocks DuoLoRA treats as content / style).

``priors`` is a click group: ``lora-merge priors sdxl`` prints a table, ``lora-merge priors SUBCOMMAND ...``
runs a sub-command.  To add a sub-command from another module without importing it eagerly, add one line
to :data:`SUBCOMMANDS` (``"name": "module:attribute"``, the attribute a click command); it is imported only
when invoked.  (Decorating with ``@priors.command()`` also works, but only once that module is imported.)
"""
from __future__ import annotations

import click

from ..plugins import resolve
from .common import output_option, print_json, stdout_console

#: sub-command name -> "module:attribute" (lazy, like the top-level COMMANDS)
SUBCOMMANDS: dict[str, str] = {
    "measure": "lora_merge.cli.priors_measure_cmd:measure",
}


class PriorsGroup(click.Group):
    """A group whose first positional argument is ARCH unless it names a sub-command."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(SUBCOMMANDS))

    def _lazy(self, name):
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        return resolve(target)

    def get_command(self, ctx, name):
        return super().get_command(ctx, name) or self._lazy(name)

    def parse_args(self, ctx, args):
        args = list(args)
        i = 0
        while i < len(args):
            tok = args[i]
            if tok == "--":
                break
            if tok in ("--arch", "-o", "--output", "--save"):
                i += 2
                continue
            if tok.startswith("-"):
                i += 1
                continue
            if tok not in SUBCOMMANDS and tok not in self.commands:
                args[i:i + 1] = ["--arch", tok]
            break
        return super().parse_args(ctx, args)


def _is_lora_path(spec: str) -> bool:
    from pathlib import Path

    p = Path(spec)
    return p.suffix.lower() in (".safetensors", ".pt", ".bin", ".ckpt") or (
        p.is_dir() and (p / "adapter_config.json").exists()
    )


@click.group("priors", cls=PriorsGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})  # fmt: skip
@click.option("--arch", "arch", default=None, metavar="ARCH",
              help="sdxl, sd1, sd2, b-lora, a registered table, a priors file or a LoRA file (also the first "
                   "argument; default: sdxl).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON (the priors file format).")
@output_option("Write the table to this priors file (--save is the older spelling).", extra=("--save",),
               default=None)
@click.option("--force", is_flag=True, help="Overwrite the -o/--output file.")
@click.pass_context
def priors(ctx: click.Context, arch: str | None, as_json: bool, output: str | None, force: bool) -> None:
    """Show layer priors: each UNet block's resolution and role (content, style, neutral).

    \b
    lora-merge priors sdxl          the paper's rule on SDXL (low resolution → content)
    lora-merge priors b-lora        B-LoRA's two blocks
    lora-merge priors my.json       a priors file (format: docs/ziplora-duolora.md)
    lora-merge priors lora.safetensors   the table for that LoRA's architecture (guessed)
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..files import check_output_folder, refuse_existing
    from ..priors import builtin_priors, load_priors

    spec, counts = arch or "sdxl", None
    if output:  # before anything is printed or loaded: one line when the output cannot be written
        refuse_existing(output, force, inputs=[spec] if _is_lora_path(spec) else ())
        check_output_folder(output)
    if _is_lora_path(spec):
        from .. import load
        from ..arch import guess_arch

        adapter = load(spec)
        guessed = guess_arch(adapter)
        if guessed is None:
            from ..errors import UsageError

            raise UsageError(f"{spec}: cannot tell the architecture of this LoRA; name it (sdxl, sd1, ...)")
        lp = load_priors(guessed, guessed)
        counts = {}
        for name in adapter.modules:
            role = lp.role_of(name)
            counts[role] = counts.get(role, 0) + 1
        click.echo(f"{spec}: architecture {guessed}; layers by role: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), err=as_json)  # fmt: skip
    else:
        lp = load_priors(spec, None)
    if output:
        lp.to_file(output, force=force)
    if as_json:
        data = lp.to_dict()
        if counts is not None:
            data["layers_by_role"] = counts
        print_json(data)
        return
    from rich.table import Table

    t = Table(title=f"layer priors: {lp.name or arch} ({lp.arch or 'any arch'})", caption=lp.source)
    t.add_column("pattern")
    t.add_column("resolution", justify="right")
    t.add_column("role")
    t.add_column("score", justify="right")
    colour = {"content": "cyan", "style": "magenta", "neutral": "dim"}
    for r in lp.rules:
        t.add_row(r.pattern, "" if r.resolution is None else str(r.resolution),
                  f"[{colour[r.role]}]{r.role}[/]", f"{r.score:g}")  # fmt: skip
    t.add_row("(anything else)", "", f"[dim]{lp.default}[/]", "")
    stdout_console().print(t)
    if not arch:
        click.echo(f"(built-in tables: {', '.join(builtin_priors())})")
