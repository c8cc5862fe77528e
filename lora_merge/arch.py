"""Architecture facts: which model a LoRA targets, and each UNet block's name and latent resolution.

Resolutions are latent sizes at the architecture's native image size (SDXL 1024 px → 128,
SD 1.x 512 px → 64), see docs/algorithms.md §7.

Other architectures are added with :func:`register_arch` (the bundled toy world registers its own
from its plug-in, see :mod:`lora_merge.plugins`); the lookups below load the plug-ins first.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import plugins

if TYPE_CHECKING:
    from .adapter import Adapter

#: the attention projections a diffusers UNet's LoRAs usually target (PEFT ``target_modules`` suffixes)
ATTENTION_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

#: block prefix (without the "unet." component) -> latent resolution
BLOCK_RESOLUTIONS: dict[str, dict[str, int]] = {
    "sdxl": {
        "down_blocks.0": 128,
        "down_blocks.1": 64,
        "down_blocks.2": 32,
        "mid_block": 32,
        "up_blocks.0": 32,
        "up_blocks.1": 64,
        "up_blocks.2": 128,
    },
    "sd1": {
        "down_blocks.0": 64,
        "down_blocks.1": 32,
        "down_blocks.2": 16,
        "down_blocks.3": 8,
        "mid_block": 8,
        "up_blocks.0": 8,
        "up_blocks.1": 16,
        "up_blocks.2": 32,
        "up_blocks.3": 64,
    },
}
BLOCK_RESOLUTIONS["sd2"] = BLOCK_RESOLUTIONS["sd1"]

#: native latent side length (the resolution rule's reference: content at most a quarter of it)
NATIVE_LATENT: dict[str, int] = {"sdxl": 128, "sd1": 64, "sd2": 64}

ARCH_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
    "sd3": "Stable Diffusion 3",
    "flux": "FLUX.1",
}

#: registered detectors, asked before the built-in rules of :func:`guess_arch`
_DETECTORS: dict[str, Callable[[Any], bool]] = {}


def register_arch(
    name: str,
    display_name: str,
    *,
    block_resolutions: dict[str, int] | None = None,
    native_latent: int | None = None,
    detect: Callable[[Adapter], bool] | None = None,
) -> None:
    """Add an architecture: its display name, its UNet blocks' latent resolutions at the native size, the
    native latent size and ``detect(adapter) -> bool`` for :func:`guess_arch` (asked before the built-in
    rules, in registration order)."""
    ARCH_NAMES[name] = display_name
    if block_resolutions is not None:
        BLOCK_RESOLUTIONS[name] = dict(block_resolutions)
    if native_latent is not None:
        NATIVE_LATENT[name] = int(native_latent)
    if detect is not None:
        _DETECTORS[name] = detect


def arch_name(arch: str) -> str:
    """Display name of ``arch`` (the name itself when unknown)."""
    plugins.load_all()
    return ARCH_NAMES.get(arch, arch)


def block_resolutions(arch: str | None) -> dict[str, int] | None:
    """Block → latent resolution of ``arch`` at its native size, or None when unknown."""
    if arch is None:
        return None
    if arch not in BLOCK_RESOLUTIONS:
        plugins.load_all()
    return BLOCK_RESOLUTIONS.get(arch)


def native_latent(arch: str | None) -> int | None:
    if arch is None:
        return None
    if arch not in NATIVE_LATENT:
        plugins.load_all()
    return NATIVE_LATENT.get(arch)


def unet_block_resolutions(unet: Any, latent_size: int | None = None) -> dict[str, int]:
    """Latent side length each block of a diffusers ``UNet2DConditionModel`` runs at, for input latents of
    side ``latent_size`` (default: the UNet's ``config.sample_size``, its native size).

    Read from the block structure (a block with a downsampler halves the size for the next one, an
    upsampler doubles it), so it holds for any UNet layout; gives SDXL's and SD 1.x's tables above."""
    if latent_size is None:
        cfg = getattr(unet, "config", None)
        sample = getattr(cfg, "sample_size", None)
        if sample is None:
            raise ValueError("pass latent_size: the model has no config.sample_size")
        latent_size = sample if isinstance(sample, int) else sample[0]
    res: dict[str, int] = {}
    size = int(latent_size)
    for i, blk in enumerate(getattr(unet, "down_blocks", [])):
        res[f"down_blocks.{i}"] = size
        if getattr(blk, "downsamplers", None) is not None:
            size = max(1, (size + 1) // 2)
    if getattr(unet, "mid_block", None) is not None:
        res["mid_block"] = size
    for i, blk in enumerate(getattr(unet, "up_blocks", [])):
        res[f"up_blocks.{i}"] = size
        if getattr(blk, "upsamplers", None) is not None:
            size *= 2
    if not res:
        raise ValueError("the model is not a UNet with down/mid/up blocks")
    return res


#: the numbered block lists of DiT transformers, in native and diffusers names: FLUX double/single, SD3's
#: joint blocks, Wan's blocks, Z-Image's layers and refiners
DIT_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "double_blocks", "single_blocks",
                   "joint_blocks", "blocks", "layers", "noise_refiner", "context_refiner")
#: a DiT block path: group 1 ``transformer_blocks.3``, group 2 the list, group 3 the index
DIT_BLOCK_RE = re.compile(rf"^transformer\.(({'|'.join(DIT_BLOCK_LISTS)})\.(\d+))\.")
_BLOCK_RE = re.compile(r"(?:^|\.)((?:down_blocks|up_blocks)\.\d+|mid_block)(?:\.(attentions|resnets|downsamplers|upsamplers)\.(\d+))?")


def component_of(name: str) -> str:
    """``unet``, ``text_encoder``, ``text_encoder_2``, ``transformer`` or ``model`` (anything else)."""
    head = name.split(".", 1)[0]
    return head if head in ("unet", "text_encoder", "text_encoder_2", "transformer") else "model"


def unet_block_of(name: str) -> str | None:
    """``down_blocks.1``/``mid_block``/``up_blocks.0`` for UNet module paths, else None."""
    if component_of(name) not in ("unet",) and not name.startswith(("down_blocks", "up_blocks", "mid_block")):
        return None
    m = _BLOCK_RE.search(name)
    return m.group(1) if m else None


def sub_block_of(name: str) -> str | None:
    """The finer block, e.g. ``up_blocks.0.attentions.1`` (B-LoRA's unit), or the block itself."""
    m = _BLOCK_RE.search(name)
    if not m or unet_block_of(name) is None:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m.group(2) else m.group(1)


def block_sort_key(block: str) -> tuple[int, int, str]:
    """UNet order of block names: ``down_blocks.*`` by index, ``mid_block``, then ``up_blocks.*``."""
    head, _, rest = block.partition(".")
    index = rest.split(".", 1)[0]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(head, 3)
    return (order, int(index) if index.isdigit() else 0, block)


def block_of(name: str) -> str:
    """A grouping key for per-block tables: UNet sub-block, text-encoder layer, or the component."""
    sub = sub_block_of(name)
    if sub is not None:
        return f"unet.{sub}"
    m = _LAYER_RE.search(name)
    comp = component_of(name)
    if m:
        return f"{comp}.{m.group(1)}" if comp != "model" else m.group(1)
    return comp


#: a numbered layer or block as whole path components (``double_blocks.3`` is not ``blocks.3``)
_LAYER_RE = re.compile(rf"(?:^|\.)((?:{'|'.join(('layer', 'h') + DIT_BLOCK_LISTS)})\.\d+)(?:\.|$)")


def resolution_of(name: str, arch: str | None) -> int | None:
    block = unet_block_of(name)
    table = block_resolutions(arch) if block is not None else None
    return None if table is None else table.get(block)


def guess_arch(adapter: Adapter) -> str | None:
    """Best guess of the base model from registered detectors, module names and shapes; None when nothing
    fits.

    PEFT adapters for non-diffusion models return their ``base_model_name_or_path``.
    """
    names = list(adapter.modules)
    if adapter.config and adapter.config.get("base_model_name_or_path") and not any(
        n.startswith(("unet.", "text_encoder")) for n in names
    ):
        return str(adapter.config["base_model_name_or_path"])
    plugins.load_all()
    for arch, detect in _DETECTORS.items():
        if detect(adapter):
            return arch
    md = adapter.metadata or {}
    if any("single_transformer_blocks" in n or "double_blocks" in n for n in names):
        return "flux"
    if any(n.startswith("transformer.") and ("add_k_proj" in n or "context" in n) for n in names):
        return "sd3"
    if any(n.startswith("text_encoder_2.") for n in names):
        return "sdxl"
    ctx_dims = set()
    for n, m in adapter.modules.items():
        if n.endswith(("attn2.to_k", "attn2.to_v")):
            ctx_dims.add(m.in_features)
    if 2048 in ctx_dims:
        return "sdxl"
    if 768 in ctx_dims:
        return "sd1"
    if 1024 in ctx_dims:
        return "sd2"
    if md.get("ss_base_model_version", "").startswith("sdxl"):
        return "sdxl"
    if any(re.search(r"up_blocks\.0\.attentions\.2\.transformer_blocks\.9\.", n) for n in names):
        return "sdxl"
    if any(n.startswith("unet.down_blocks.0.attentions") for n in names):
        return "sd1"
    return None


def is_diffusion_adapter(adapter: Adapter) -> bool:
    """Whether the adapter's modules belong to a diffusion pipeline (UNet, text encoders, transformer)."""
    def diffusion(n: str) -> bool:
        comp = component_of(n)
        if comp == "transformer":  # DiT blocks (FLUX.1, SD3, Wan), not GPT-2's transformer.h.N
            return re.match(r"transformer\.((transformer_blocks|single_transformer_blocks|double_blocks|"
                            r"single_blocks|joint_blocks|blocks)\.\d+\.|(layers|noise_refiner|context_refiner)"
                            r"\.\d+\.(attention|feed_forward|adaLN_modulation)\.)", n) is not None
        return comp != "model" or unet_block_of(n) is not None

    return any(diffusion(n) for n in adapter.modules)


def arch_family(adapter: Adapter) -> tuple[str, frozenset[str] | None, str]:
    """What :func:`check_same_arch` compares: ``(kind, possible archs, label)``.

    ``kind`` is ``"diffusion"`` or ``"model"`` (any other model, e.g. a PEFT adapter of GPT-2);
    ``possible archs`` is None when the modules do not tell (a small partial LoRA), else the set of
    architectures the adapter can belong to (``{"sd1", "sd2"}`` when only SDXL is ruled out); the label
    names it in a message."""
    if not is_diffusion_adapter(adapter):
        base = (adapter.config or {}).get("base_model_name_or_path")
        return "model", None, str(base) if base else "a non-diffusion model"
    guess = guess_arch(adapter)
    plugins.load_all()
    if guess is None or guess not in ARCH_NAMES:  # None, or a PEFT config's base_model_name_or_path
        return "diffusion", None, "an unknown diffusion model"
    strong = guess
    if guess == "sd1" and not any(n.endswith(("attn2.to_k", "attn2.to_v")) for n in adapter.modules):
        # guessed from the block layout only: SD 2.x has the same blocks (SDXL has no down_blocks.0 attentions)
        return "diffusion", frozenset({"sd1", "sd2"}), "Stable Diffusion 1.x/2.x"
    return "diffusion", frozenset({strong}), arch_name(strong)


def mixed_arch_problem(adapters: list[Adapter], names: list[str]) -> str | None:
    """A one-line description of the first pair of inputs whose architectures differ, or None.

    Two diffusion LoRAs are compatible when their possible architectures overlap (an unknown one is
    compatible with every one); two adapters of non-diffusion models are compared by their module names
    and shapes only; a diffusion LoRA and an adapter of another model never are."""
    fams = [arch_family(ad) for ad in adapters]
    for i in range(len(fams)):
        for j in range(i + 1, len(fams)):
            (ki, ai, li), (kj, aj, lj) = fams[i], fams[j]
            if ki != kj or (ai is not None and aj is not None and not ai & aj):
                return (f"input {i + 1} ({names[i]}) is a LoRA for {li} but input {j + 1} ({names[j]}) is for "
                        f"{lj}; LoRAs of different base models cannot be merged")
    return None
