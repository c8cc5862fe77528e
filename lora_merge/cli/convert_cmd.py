"""``lora-merge convert IN -o OUT --to kohya|diffusers|peft|comfyui``: rewrite an adapter in another dialect."""
from __future__ import annotations

import click

from .common import (
    DialectChoice,
    allow_pickle_option,
    base_weights_option,
    check_file_path_text,
    dtype_option,
    format_option,
    load_adapter,
    output_option,
    repair_option,
    storage_dtype,
    strict_option,
)


@click.command("convert", short_help="Rewrite an adapter in another dialect (ΔW unchanged).")
@click.argument("src", metavar="IN", type=click.Path(path_type=str))
@click.argument("dst", metavar="[OUT]", required=False, type=click.Path(path_type=str))
@output_option("Output file (a folder for --to peft); also accepted as the second argument.",
               type=click.Path(path_type=str))
@click.option("--to", "to", default=None, type=DialectChoice(writable=True),
              help="Output dialect: kohya (A1111/ComfyUI), diffusers (lora_A/lora_B names), peft (a folder) or "
                   "comfyui (diffusion_model.<original names>). Default: kohya for SD/SDXL UNet and text-encoder LoRAs (every loader reads it); "
                   "required for other adapters.")
@dtype_option("Stored dtype (default: the input's when all its tensors share one, else fp32; either way ΔW is "
              "unchanged). The same rule as merge's.", default=None)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists (never an input).")
@click.option("--keep-heads", is_flag=True,
              help="kohya/diffusers output of a PEFT adapter: store its modules_to_save tensors (classifier heads) "
                   "in the file, so converting back to peft restores them (LoRA loaders ignore them).")
@repair_option
@click.option("--rank", type=click.IntRange(min=1), default=None, metavar="K",
              help="Re-factor to a LoRA of this rank (needed for LyCORIS LoHa/LoKr/diff input; default: the "
                   "input's factors as they are); the relative ΔW error it costs is reported.")
@click.option("--max-error", type=click.FloatRange(min=0), default=None, metavar="X",
              help="With --rank: refuse (write nothing) when the relative ΔW error over all modules is above this "
                   "(default: no limit).")
@base_weights_option("The base model's weights file (.safetensors, not a model folder): makes a DoRA adapter's "
                     "update exact (then give --rank).")
@format_option
@strict_option
@allow_pickle_option
def convert_cmd(src, dst, output, to, dtype, force, keep_heads, repair, rank, max_error, base_weights, fmt, strict,
                allow_pickle):
    """Convert adapter IN to the dialect given by --to and write it to OUT (-o OUT, or OUT after IN).

    Every module's ΔW is preserved exactly (alpha is written so the scale is unchanged) and the
    metadata is kept. OUT is a .safetensors file, or a folder for --to peft. Check the result with
    `lora-merge diff IN OUT --fail-above 1e-6`.
    """
    from ..errors import UsageError
    from ..files import parse_dtype
    from ..formats.api import save
    from ..formats.clients import default_output_dialect, is_sd_lora, loader_note

    if dst is not None and output is not None and dst != output:
        raise UsageError(f"two outputs: OUT {dst!r} and -o {output!r}; give one")
    dst = output if output is not None else dst
    if dst is None:
        raise UsageError("no output: give -o/--output OUT")
    check_file_path_text(dst, to)
    if base_weights is None:
        adapter = load_adapter(src, fmt=fmt, strict=strict, allow_pickle=allow_pickle, repair=repair)
    else:
        import lora_merge

        adapter = lora_merge.load(src, format=fmt, strict=strict, allow_pickle=allow_pickle, base_weights=base_weights,
                                  **({"repair": True} if repair else {}))
    if dtype is None and storage_dtype([adapter]) is None:  # mixed dtypes: fp32 holds each of them exactly
        dtype = "fp32"
    from ..formats.lycoris import describe_cost, to_lora_for_output

    adapter, cost = to_lora_for_output(adapter, rank, max_error)
    if to is None:
        if not is_sd_lora(adapter):
            raise UsageError("--to is required for adapters that are not SD/SDXL UNet or text-encoder LoRAs "
                             "(kohya, diffusers, peft or comfyui)")
        to = default_output_dialect(adapter)
    out = save(adapter, dst, to=to.lower(), force=force, dtype=parse_dtype(dtype), keep_heads=keep_heads)
    click.echo(f"wrote {out} ({to.lower()}, {len(adapter)} modules)", err=True)
    if cost is not None:
        click.echo(describe_cost(cost), err=True)
    note = loader_note(adapter, to.lower())
    if note:
        click.echo(f"note: {note}", err=True)
