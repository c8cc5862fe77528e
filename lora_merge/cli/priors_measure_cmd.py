"""``lora-merge priors measure``: measure which block groups carry content and which carry style."""
from __future__ import annotations

import click

from .. import families
from ..errors import UsageError
from .common import (
    allow_pickle_option,
    dtype_option,
    fmt_num,
    json_option,
    output_option,
    print_json,
    stderr_console,
    stdout_console,
)

GRANULARITY_HELP = ("Groups to probe: resolution (attention blocks grouped by latent resolution), block (each "
                    "UNet block; each transformer block of a DiT), attention (each attention sub-block, B-LoRA's "
                    "unit) or layer (each LoRA layer). Default: resolution for a UNet, block for a DiT "
                    f"({families.help_list(lambda f: f.kind == 'dit' and bool(f.pipelines))}), which has no "
                    "resolutions.")


@click.command("measure", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("content", required=False, type=click.Path())
@click.argument("style", required=False, type=click.Path())
@click.option("--base", "base", required=True, metavar="MODEL_DIR",
              help=f"The base model: a local diffusers pipeline folder ({families.help_list(lambda f: bool(f.pipelines))}; "
              "a folder, not a weights file) or 'toyworld'. Nothing is downloaded.")
@click.option("--content-images", type=click.Path(), help="Folder of the content LoRA's reference images "
              "(toyworld: its training renders).")
@click.option("--content-prompt", help="Prompt of the content images (toyworld: 'a sks object').")
@click.option("--style-images", type=click.Path(), help="Folder of the style LoRA's reference images "
              "(toyworld: its training renders).")
@click.option("--style-prompt", help="Prompt of the style images (toyworld: each render's training caption).")
@click.option("--granularity", type=click.Choice(["resolution", "block", "attention", "layer"]),
              default=None, help=GRANULARITY_HELP)
@click.option("--judge", "use_judge", is_flag=True,
              help="toyworld only: run the paper's experiment instead — generate with each group scaled down and "
              "score content and style with the toy world's judge.")
@click.option("--compare", is_flag=True,
              help="toyworld only: run both the noise measure and the judged experiment and report whether the "
              "roles agree per group (the priors file gets the noise measure's roles).")
@click.option("--scale", default=0.0, show_default=True, type=float,
              help="Strength a group is scaled down to (0 = removed).")
@click.option("--samples", default=4, show_default=True, type=int,
              help="Noisy versions (seeded noise and timestep) of each reference image.")
@click.option("--images", "n_images", default=16, show_default=True, type=int,
              help="toyworld: number of reference renders per concept.")
@click.option("--n", "n_judge", default=64, show_default=True, type=int,
              help="--judge: images generated per evaluation.")
@click.option("--margin", default=0.1, show_default=True, type=float,
              help="Role rule: |content_lost − style_lost| below this → neutral.")
@click.option("--floor", default=0.05, show_default=True, type=float,
              help="Role rule: max(content_lost, style_lost) below this → neutral.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Denoiser batch size.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the noise, timesteps and images.")
@click.option("--device", default="cpu", show_default=True, metavar="DEVICE", help="torch device, e.g. cuda.")
@dtype_option("Denoiser dtype (deviations are always summed in fp64).", default="fp32", show_default=True)
@output_option("Write the priors file (JSON, or YAML by extension; default: print only); use it with "
               "`lora-merge merge C S --strategy duolora --priors FILE`.")
@click.option("--plot", type=click.Path(), metavar="FILE",
              help="Also write a bar chart PNG of the two profiles and the roles.")
@click.option("--force", is_flag=True, help="Overwrite the output files.")
@allow_pickle_option
@json_option
def measure(content, style, base, content_images, content_prompt, style_images, style_prompt, granularity,
            use_judge, compare, scale, samples, n_images, n_judge, margin, floor, batch_size, seed, device, dtype,
            output, plot, force, allow_pickle, as_json):
    """Measure which block groups of the base model (UNet resolutions or blocks; a DiT's transformer
    blocks) carry CONTENT's and which STYLE's effect, and assign each group a role (content, style,
    neutral) by the documented rule (docs/priors.md).

    For each group, that LoRA's layers in the group are scaled down and the fraction of the LoRA's effect
    on its own reference images that is lost is measured: ‖ε_full − ε_without_group‖² / ‖ε_full − ε_base‖²
    on a fixed seeded set of noisy latents.  With --base toyworld, CONTENT/STYLE default to the bundled
    LoRAs and the images/prompts to their training references.
    """
    from ..files import check_output_folder, refuse_existing
    from ..model_mode.measure_priors import measure as noise_measure
    from ..priors.measured import compare as compare_roles
    from ..priors.measured import write_measured
    from .common import load_adapter

    toy = base == "toyworld"
    if (use_judge or compare) and not toy:
        raise UsageError("--judge/--compare need a judge; only the bundled toy world has one (--base toyworld)")
    if toy and (content is None or style is None):
        from ..toyworld import bundled_loras

        paths = bundled_loras()
        content = content or str(paths["content"])
        style = style or str(paths["style"])
    if content is None or style is None:
        raise UsageError("give the CONTENT and STYLE LoRA files (only --base toyworld has bundled ones)")
    for p in (output, plot):
        if p:
            refuse_existing(p, force, inputs=(content, style))
            check_output_folder(p)
    c_ad, s_ad = load_adapter(content), load_adapter(style)
    console = stderr_console()
    settings = {"granularity": granularity, "scale": scale, "seed": seed, "margin": margin, "floor": floor}

    from ..progress import progress_bar

    noise = judged = None
    if compare or not use_judge:
        with progress_bar("noise measure", enabled=not as_json) as bar:
            noise = noise_measure(base, c_ad, s_ad, content_images=content_images, content_prompt=content_prompt,
                                  style_images=style_images, style_prompt=style_prompt, n_images=n_images,
                                  n_noise=samples, batch_size=batch_size, device=device, dtype=dtype,
                                  progress=bar, allow_pickle=allow_pickle, **settings)  # fmt: skip
    if compare or use_judge:
        from ..bench.judged_priors import judge_priors

        with progress_bar("judged experiment", enabled=not as_json) as bar:
            judged = judge_priors(c_ad, s_ad, n=n_judge, device=device, progress=bar, **settings)
    main = judged if (use_judge and not compare) else noise
    agreement = compare_roles(noise, judged) if (noise is not None and judged is not None) else None
    if output:
        write_measured(main, output, force=force, inputs=(content, style))
    if plot:
        from ..bench.plots import plot_roles

        plot_roles(main, plot)
    if as_json:
        doc = {"priors": main.to_dict(), "output": output, "plot": plot}
        if agreement is not None:
            doc["judged"] = judged.to_dict()
            doc["agreement"] = agreement
            doc["all_agree"] = all(r["agree"] for r in agreement)
        print_json(doc)
        return
    out = stdout_console()
    out.print(_table(main))
    if agreement is not None:
        out.print(_table(judged))
        out.print(_agreement_table(agreement))
    if output:
        console.print(f"priors written to {output}; use it with: lora-merge merge C S --strategy duolora "
                      f"--priors {output}")
    if plot:
        console.print(f"bar chart written to {plot}")


def _table(result):
    from rich.table import Table

    colors = {"content": "blue", "style": "magenta", "neutral": "dim"}
    t = Table(title=f"measured layer priors ({result.method}; score = content lost − style lost; "
                    f"margin {fmt_num(result.settings.get('margin'))}, floor {fmt_num(result.settings.get('floor'))})")
    for col in ("group", "blocks", "res", "layers", "content lost", "style lost", "score", "role"):
        t.add_column(col, justify="right" if col in ("res", "layers", "content lost", "style lost", "score") else "left")
    for g in result.groups:
        t.add_row(g.group.name, ", ".join(g.group.blocks) if len(g.group.blocks) <= 4 else f"{len(g.group.blocks)} blocks",
                  fmt_num(g.group.resolution), str(len(g.group.modules)), f"{g.content_lost:.3f}",
                  f"{g.style_lost:.3f}", f"{g.score:+.3f}", f"[{colors[g.role]}]{g.role}[/]")  # fmt: skip
    return t


def _agreement_table(rows):
    from rich.table import Table

    t = Table(title="noise measure vs judged experiment")
    for col in ("group", "noise role", "judged role", "agree"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["group"], r["noise_role"], str(r["judge_role"]), "yes" if r["agree"] else "[red]NO[/]")
    return t
