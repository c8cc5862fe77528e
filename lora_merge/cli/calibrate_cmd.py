"""``lora-merge calibrate``: record per-layer input second moments for the weight-space strategies."""

from __future__ import annotations

import click

from .common import (
    allow_pickle_option,
    dtype_option,
    json_option,
    output_option,
    print_json,
    stderr_console,
    stdout_console,
)


@click.command("calibrate", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--base",
    "base",
    required=True,
    metavar="MODEL_DIR",
    help="The base model: a local diffusers pipeline folder (SD 1.x, SDXL; a folder, not a weights file) or "
    "'toyworld'. Nothing is downloaded.",
)
@click.option(
    "--content-images",
    required=True,
    type=click.Path(),
    help="Folder of content reference images (toyworld:content: the toy world's).",
)
@click.option(
    "--content-prompt", required=True, help="Prompt of the content images, e.g. 'a photo of sks dog'."
)
@click.option(
    "--style-images",
    required=True,
    type=click.Path(),
    help="Folder of style reference images (toyworld:style: the toy world's).",
)
@click.option("--style-prompt", required=True, help="Prompt of the style images, e.g. 'a cat in zkz style'.")
@output_option("Stats file to write (.safetensors).", required=True)
@click.option("--adapter", "adapters", multiple=True, type=click.Path(),
              help="Record the UNet layers this LoRA touches (repeatable). Default: every attention "
              "projection (to_q, to_k, to_v, to_out.0).")  # fmt: skip
@click.option(
    "--layers",
    "layers",
    default=None,
    metavar="PATTERN",
    help="Only layers whose name matches PATTERN (as merge --weight's; default: every layer).",
)
@click.option(
    "--samples",
    default=4,
    show_default=True,
    type=int,
    help="Noisy versions (seeded noise and timestep) of each image.",
)
@click.option("--batch-size", default=8, show_default=True, type=int, help="UNet batch size.")
@click.option(
    "--rank",
    default=None,
    type=int,
    help="Store each moment as its top-K eigenpairs (smaller files for SDXL); default: full matrices.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the noise and timesteps.")
@click.option("--device", default="cpu", show_default=True, metavar="DEVICE", help="torch device, e.g. cuda or cuda:1.")
@dtype_option("UNet dtype (moments are always accumulated in fp32).", default="fp32", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite the output (never an input).")
@allow_pickle_option
@json_option
def calibrate_cmd(
    base,
    content_images,
    content_prompt,
    style_images,
    style_prompt,
    output,
    adapters,
    layers,
    samples,
    batch_size,
    rank,
    seed,
    device,
    dtype,
    force,
    allow_pickle,
    as_json,
):
    """Record E[x xᵀ] of the inputs of each LoRA'd UNet layer on the content and the style references.

    The base model (no LoRA) runs on noisy versions of the reference images with their prompts; the
    written file feeds `lora-merge merge --strategy ziplora|duolora` with the input model `stats`.
    """
    from ..files import check_output_folder, parse_dtype, refuse_existing
    from ..masks import Concept, References
    from ..model_mode.base_model import load_base_model
    from ..model_mode.calibrate import calibrate
    from .common import load_adapter

    refuse_existing(output, force, inputs=adapters)  # before the (minutes-long) model load
    check_output_folder(output)
    loaded = [load_adapter(a) for a in adapters]
    model = load_base_model(base, device=device, dtype=parse_dtype(dtype), allow_pickle=allow_pickle)
    refs = References(Concept(content_images, content_prompt), Concept(style_images, style_prompt))
    summary = calibrate(model, output, refs, adapters=loaded, layers=layers, samples=samples,
                        batch_size=batch_size, rank=rank, seed=seed, force=force, progress=not as_json)  # fmt: skip
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    from .common import human_bytes

    t = Table(title="input statistics written")
    for col in ("file", "layers", "content vectors", "style vectors", "stored", "size"):
        t.add_column(col)
    t.add_row(summary["output"], str(summary["layers"]), f"{summary['counts']['content']:,}",
              f"{summary['counts']['style']:,}", summary["rank"], human_bytes(summary["bytes"]))  # fmt: skip
    stdout_console().print(t)
    stderr_console().print(
        "use it with: lora-merge merge C S --strategy ziplora|duolora "
        f"--input-model stats --stats {summary['output']}"
    )
