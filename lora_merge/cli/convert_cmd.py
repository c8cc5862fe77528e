"""``lora-merge convert IN OUT --to kohya|diffusers|peft``: rewrite an adapter in another dialect."""
from __future__ import annotations

import click

from .common import DialectChoice, allow_pickle_option, format_option, load_adapter, strict_option

#: the ``--dtype`` spellings offered here; :func:`lora_merge.files.parse_dtype` turns them into torch dtypes
_DTYPE_CHOICES = ("bf16", "fp16", "fp32")


@click.command("convert", short_help="Rewrite an adapter in another dialect (ΔW unchanged).")
@click.argument("src", metavar="IN", type=click.Path(path_type=str))
@click.argument("dst", metavar="OUT", type=click.Path(path_type=str))
@click.option("--to", "to", required=True, type=DialectChoice(),
              help="Output dialect: kohya (A1111/ComfyUI), diffusers (lora_A/lora_B names) or peft (a folder).")
@click.option("--dtype", type=click.Choice(_DTYPE_CHOICES), default=None,
              help="Cast the tensors on write (default: keep each tensor's dtype, so ΔW is unchanged).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists (never an input).")
@format_option
@strict_option
@allow_pickle_option
def convert_cmd(src, dst, to, dtype, force, fmt, strict, allow_pickle):
    """Convert adapter IN to the dialect given by --to and write it to OUT.

    Every module's ΔW is preserved exactly (alpha is written so the scale is unchanged) and the
    metadata is kept. OUT is a .safetensors file, or a folder for --to peft. Check the result with
    `lora-merge diff IN OUT --fail-above 1e-6`.
    """
    from ..files import parse_dtype
    from ..formats.api import save

    adapter = load_adapter(src, fmt=fmt, strict=strict, allow_pickle=allow_pickle)
    out = save(adapter, dst, to=to.lower(), force=force, dtype=parse_dtype(dtype))
    click.echo(f"wrote {out} ({to.lower()}, {len(adapter)} modules)", err=True)

