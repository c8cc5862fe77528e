"""Architecture facts: which model a LoRA targets, and each UNet block's name and latent resolution.

Resolutions are latent sizes at the architecture's native image size (SDXL 1024 px → 128,
SD 1.x 512 px → 64), see ../shared/reference/algorithms.md §7.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapter import Adapter

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
#: the toy world's UNet (lora_merge.toyworld) at its native 16 px: SDXL's block layout at 16 → 8 → 4
BLOCK_RESOLUTIONS["toyworld"] = {
    "down_blocks.0": 16,
    "down_blocks.1": 8,
    "down_blocks.2": 4,
    "mid_block": 4,
    "up_blocks.0": 4,
    "up_blocks.1": 8,
    "up_blocks.2": 16,
}

ARCH_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
    "sd3": "Stable Diffusion 3",
    "flux": "FLUX.1",
    "toyworld": "lora-merge toy world (SDXL-shaped)",
}

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


def block_of(name: str) -> str:
    """A grouping key for per-block tables: UNet sub-block, text-encoder layer, or the component."""
    sub = sub_block_of(name)
    if sub is not None:
        return f"unet.{sub}"
    m = re.search(r"(?:layers|layer|h|blocks|transformer_blocks|single_transformer_blocks)\.(\d+)", name)
    comp = component_of(name)
    if m:
        return f"{comp}.{m.group(0)}" if comp != "model" else m.group(0)
    return comp


def resolution_of(name: str, arch: str | None) -> int | None:
    block = unet_block_of(name)
    if block is None or arch not in BLOCK_RESOLUTIONS:
        return None
    return BLOCK_RESOLUTIONS[arch].get(block)


def guess_arch(adapter: Adapter) -> str | None:
    """Best guess of the base model from module names and shapes; None when nothing fits.

    PEFT adapters for non-diffusion models return their ``base_model_name_or_path``.
    """
    names = list(adapter.modules)
    if adapter.config and adapter.config.get("base_model_name_or_path") and not any(
        n.startswith(("unet.", "text_encoder")) for n in names
    ):
        return str(adapter.config["base_model_name_or_path"])
    md = adapter.metadata or {}
    spec = md.get("modelspec.architecture", "")
    if "toyworld" in spec:
        return "toyworld"
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
