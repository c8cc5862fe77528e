"""Which loaders read what we write, and the defaults that follow from it (docs/formats.md, "What the
files we write load with").

- The **kohya** dialect (``lora_unet_…``/``lora_te…`` names, a 0-d alpha per module) is the one layout
  that diffusers (its kohya converter), ComfyUI, A1111/Forge and kohya's sd-scripts all load for SD 1.x,
  SD 2.x and SDXL UNet and text-encoder LoRAs: :func:`default_output_dialect` picks it for those.
- diffusers' ``load_lora_weights`` (0.42) gives a kohya file whose modules carry *different* alphas the
  wrong scale on some modules; :func:`one_alpha` rewrites an adapter with one alpha for every module
  (the scale moved into B) so a merge written as kohya loads exactly everywhere, and
  :func:`mixed_alpha_note` says so when a file keeps mixed alphas (a conversion stays bit-exact).
- The **diffusers** dialect (``unet.….to_q.lora_A.weight``) is read by diffusers and PEFT; ComfyUI does
  not apply its UNet attention modules (checked with its loader code: 0 of 128 applied, "lora key not loaded")
  and A1111/Forge read kohya names. :func:`loader_note` says which loaders will not read a file.
"""

from __future__ import annotations

import collections

from .. import arch
from ..adapter import Adapter, LoraModule, TensorRef
from ..errors import UsageError
from .common import standard_alpha
from .registry import get_dialect

__all__ = [
    "SD_COMPONENTS",
    "LoaderWarning",
    "check_writable",
    "default_output_dialect",
    "is_sd_lora",
    "loader_note",
    "mixed_alpha_note",
    "one_alpha",
    "read_only_default_note",
]

#: the pipeline parts of SD 1.x / 2.x / SDXL whose kohya names every client maps
SD_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class LoaderWarning(UserWarning):
    """A file we write will not load (or not load exactly) in some common loader."""


def is_sd_lora(adapter: Adapter) -> bool:
    """Every module is in an SD 1.x/2.x/SDXL UNet or text encoder (not a DiT transformer, not another
    model's PEFT adapter)."""
    if not adapter.modules:
        return False
    if not all(arch.component_of(n) in SD_COMPONENTS for n in adapter.modules):
        return False
    return arch.guess_arch(adapter) not in ("flux", "sd3")


def default_output_dialect(adapters: Adapter | list[Adapter]) -> str:
    """The output dialect when ``--to`` is not given: kohya for SD/SDXL UNet and text-encoder LoRAs (what
    every loader reads), else the first adapter's own dialect (diffusers when it has none)."""
    ads = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    if ads and all(is_sd_lora(ad) for ad in ads):
        return "kohya"
    own = (ads[0].dialect if ads else None) or "diffusers"
    return own if dialect_writable(own) else READ_ONLY_FALLBACK


#: what a merge of read-only-dialect inputs (XLabs FLUX.1) is written as without ``--to``: kohya's native
#: fused FLUX names, which ComfyUI, Forge and kohya read (and diffusers converts)
READ_ONLY_FALLBACK = "kohya"


def dialect_writable(name: str) -> bool:
    return bool(getattr(get_dialect(name, what="output format"), "writable", True))


def read_only_default_note(adapters: list[Adapter]) -> str | None:
    """When the default output dialect replaces the inputs' read-only one, the sentence that says so."""
    own = (adapters[0].dialect if adapters else None) or "diffusers"
    if dialect_writable(own) or all(is_sd_lora(ad) for ad in adapters):
        return None
    return (f"the inputs' {own} dialect is read only: writing {READ_ONLY_FALLBACK} (native FLUX.1 names, read by "
            "ComfyUI, Forge and kohya); --to picks another")


def loader_note(adapter: Adapter, dialect: str) -> str | None:
    """One sentence naming the common loaders that will not read ``adapter`` written as ``dialect``, or
    None when they all do (or the adapter is not an SD LoRA, where only diffusers/PEFT matter)."""
    if dialect in ("kohya", "comfyui") and arch.guess_arch(adapter) == "sd3":
        return (f"{dialect}-dialect SD3 file (MMDiT names, fused qkv): sd-scripts and ComfyUI read it, but "
                "diffusers' StableDiffusion3Pipeline.load_lora_weights converts no SD3 names (0.42) — write "
                "--to diffusers for diffusers pipelines")
    if not is_sd_lora(adapter):
        return None
    if dialect == "diffusers":
        return ("diffusers-dialect file (unet.….lora_A/lora_B names): diffusers and PEFT load it, but ComfyUI "
                "does not apply its UNet attention modules (to_q/to_k/to_v/to_out.0; it logs 'lora key not "
                "loaded') and A1111/Forge read kohya names — write --to kohya (the default) for them")
    if dialect == "peft":
        comps = {arch.component_of(n) for n in adapter.modules}
        if comps == {"unet"}:
            return ("PEFT folder of an SD UNet LoRA (names relative to the UNet): "
                    "PeftModel.from_pretrained(unet, folder) attaches it; ComfyUI and A1111/Forge do not "
                    "read PEFT folders — write --to kohya (the default) for them")
        return ("PEFT folder of an SD " + ", ".join(sorted(comps)) + " LoRA: ComfyUI and A1111/Forge do not "
                "read PEFT folders — write --to kohya (the default) for them")
    return None


def check_writable(adapters: Adapter | list[Adapter], dialect: str) -> None:
    """Refuse an output no loader could attach: a PEFT folder of an SD LoRA whose modules span several
    pipeline components (UNet and text encoders).  A PEFT adapter belongs to one model, so such a folder
    would carry pipeline names (``base_model.model.<component>.…``) that PEFT and diffusers cannot attach
    and ComfyUI and A1111/Forge do not read; a UNet-only LoRA is written relative to the UNet."""
    if dialect != "peft":
        return
    ads = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    if not ads or not all(is_sd_lora(ad) for ad in ads):
        return
    comps = sorted({arch.component_of(n) for ad in ads for n in ad.modules})
    if len(comps) > 1:
        raise UsageError(
            "--to peft: a PEFT folder holds one model's adapter, but these modules span "
            + " and ".join(comps) + "; PEFT and diffusers could not attach it and ComfyUI and A1111/Forge do "
            "not read PEFT folders — write --to kohya (every loader reads it) or --to diffusers"
        )


def _alphas(adapter: Adapter) -> collections.Counter:
    return collections.Counter(standard_alpha(m) for m in adapter)


def mixed_alpha_note(adapter: Adapter) -> str | None:
    """Why a kohya file of ``adapter`` loads mis-scaled in diffusers, or None (one alpha everywhere)."""
    if not is_sd_lora(adapter):
        return None
    alphas = _alphas(adapter)
    if len(alphas) < 2:
        return None
    shown = ", ".join(f"{a:g}" for a, _ in alphas.most_common(3)) + (", …" if len(alphas) > 3 else "")
    return (f"the modules have {len(alphas)} different alphas ({shown}); ComfyUI, A1111/Forge and kohya "
            "apply them exactly, but diffusers' load_lora_weights (0.42) gives some modules of such a kohya "
            "file the wrong scale — for diffusers, convert with --to diffusers (exact)")


def one_alpha(adapter: Adapter) -> Adapter:
    """``adapter`` with one alpha for every module (the most common one), each other module's ``B``
    multiplied by ``old scale / new scale`` in fp32 so ΔW is unchanged (to one rounding of B).  Modules
    with the common alpha are kept bit for bit.  Returns ``adapter`` itself when nothing changes."""
    alphas = _alphas(adapter)
    if len(alphas) < 2:
        return adapter
    common = alphas.most_common(1)[0][0]
    out = Adapter(modules={}, extra_tensors=adapter.extra_tensors, metadata=adapter.metadata,
                  dialect=adapter.dialect, config=adapter.config, source=adapter.source)
    out.dialect_variant = adapter.dialect_variant
    for name, m in adapter.modules.items():
        if standard_alpha(m) == common and m.scale_rule == "standard":
            out.modules[name] = m
            continue
        new_scale = common / m.rank
        up = m.up.load()
        factor = m.scale / new_scale
        up = (up.float() * factor).to(up.dtype)
        out.modules[name] = LoraModule(name=name, down=m.down, up=TensorRef.from_tensor(up, m.up.key),
                                       alpha=float(common), scale_rule="standard", source_key=m.source_key,
                                       bias=m.bias)
    return out

