"""``lora-merge convert IN OUT --to kohya|diffusers|peft``: rewrite an adapter in another dialect."""
from __future__ import annotations

import click

from .common import (
    DialectChoice,
    allow_pickle_option,
    check_file_path_text,
    format_option,
    load_adapter,
    strict_option,
)

#: the ``--dtype`` spellings offered here; :func:`lora_merge.files.parse_dtype` turns them into torch dtypes
_DTYPE_CHOICES = ("bf16", "fp16", "fp32")


@click.command("convert", short_help="Rewrite an adapter in another dialect (ΔW unchanged).")
@click.argument("src", metavar="IN", type=click.Path(path_type=str))
@click.argument("dst", metavar="OUT", type=click.Path(path_type=str))
@click.option("--to", "to", default=None, type=DialectChoice(),
              help="Output dialect: kohya (A1111/ComfyUI), diffusers (lora_A/lora_B names) or peft (a folder). "
                   "Default: kohya for SD/SDXL UNet and text-encoder LoRAs (every loader reads it); required "
                   "for other adapters.")
@click.option("--dtype", type=click.Choice(_DTYPE_CHOICES), default=None,
              help="Cast the tensors on write (default: keep each tensor's dtype, so ΔW is unchanged).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists (never an input).")
@click.option("--keep-heads", is_flag=True,
              help="kohya/diffusers output of a PEFT adapter: store its modules_to_save tensors (classifier heads) "
                   "in the file, so converting back to peft restores them (LoRA loaders ignore them).")
@click.option("--repair", is_flag=True,
              help="Rename the keys of a known broken layout first (lora_unet_unet_…_lora_down.weight, the "
                   "common broken kohya conversion); the tensors are unchanged.")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="Re-factor to a LoRA of this rank (needed for LyCORIS LoHa/LoKr/diff input); the relative ΔW "
                   "error it costs is reported.")
@click.option("--max-error", type=click.FloatRange(min=0), default=None,
              help="With --rank: refuse (write nothing) when the relative ΔW error over all modules is above this.")
@click.option("--base-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The base model's .safetensors: makes a DoRA adapter's update exact (then give --rank).")
@format_option
@strict_option
@allow_pickle_option
def convert_cmd(src, dst, to, dtype, force, keep_heads, repair, rank, max_error, base_weights, fmt, strict, allow_pickle):
    """Convert adapter IN to the dialect given by --to and write it to OUT.

    Every module's ΔW is preserved exactly (alpha is written so the scale is unchanged) and the
    metadata is kept. OUT is a .safetensors file, or a folder for --to peft. Check the result with
    `lora-merge diff IN OUT --fail-above 1e-6`.
    """
    from ..errors import UsageError
    from ..files import parse_dtype
    from ..formats.api import save
    from ..formats.clients import default_output_dialect, is_sd_lora, loader_note

    check_file_path_text(dst, to)
    if base_weights is None:
        adapter = load_adapter(src, fmt=fmt, strict=strict, allow_pickle=allow_pickle, repair=repair)
    else:
        import lora_merge

        adapter = lora_merge.load(src, format=fmt, strict=strict, allow_pickle=allow_pickle, base_weights=base_weights)
    from ..formats.lycoris import describe_cost, to_lora_for_output

    adapter, cost = to_lora_for_output(adapter, rank, max_error)
    if to is None:
        if not is_sd_lora(adapter):
            raise UsageError("--to is required for adapters that are not SD/SDXL UNet or text-encoder LoRAs "
                             "(kohya, diffusers or peft)")
        to = default_output_dialect(adapter)
    out = save(adapter, dst, to=to.lower(), force=force, dtype=parse_dtype(dtype), keep_heads=keep_heads)
    click.echo(f"wrote {out} ({to.lower()}, {len(adapter)} modules)", err=True)
    if cost is not None:
        click.echo(describe_cost(cost), err=True)
    note = loader_note(adapter, to.lower())
    if note:
        click.echo(f"note: {note}", err=True)

