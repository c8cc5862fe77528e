"""A tiny random text-to-image model and random LoRAs for it: smoke tests of model mode without downloads.

``tiny_base_model()`` is a diffusers ``UNet2DConditionModel`` built from a small config (cross-attention
in ``down_blocks.0`` and ``up_blocks.1``), a seeded word-embedding stand-in for the text encoder and a
DDPM scheduler, as a :class:`~lora_merge.model_mode.base_model.BaseModel` in pixel space (images are the
latents).  ``random_lora()`` makes an :class:`~lora_merge.adapter.Adapter` on its attention projections.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ..adapter import Adapter, LoraModule
from ..arch import ATTENTION_TARGETS
from .base_model import BaseModel

TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


def _word_seed(word: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{word}".encode()).digest()[:7], "little")


def tiny_base_model(
    seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, tokens: int = 6
) -> BaseModel:
    """The tiny random model (deterministic for a seed).  Prompts map word by word to seeded embeddings."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG).to(device)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    unet.eval().requires_grad_(False)
    dim = TINY_UNET_CONFIG["cross_attention_dim"]

    def encode(prompts: list[str]) -> torch.Tensor:
        rows = []
        for p in prompts:
            words = (p.lower().split() + ["<pad>"] * tokens)[:tokens]
            rows.append(torch.stack([
                torch.randn(dim, generator=torch.Generator().manual_seed(_word_seed(w, seed))) for w in words
            ]))  # fmt: skip
        return torch.stack(rows)

    return BaseModel(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000), arch=None,
                     image_size=TINY_UNET_CONFIG["sample_size"], encode_prompt_fn=encode,
                     encode_images_fn=None,
                     name="tiny-random", device=torch.device(device), dtype=dtype)  # fmt: skip


def random_lora(
    unet: torch.nn.Module,
    seed: int,
    rank: int = 4,
    alpha: float | None = 2.0,
    std: float = 0.3,
    targets: Sequence[str] = ATTENTION_TARGETS,
    prefix: str = "unet.",
) -> Adapter:
    """A random LoRA on every ``targets`` Linear of ``unet`` (canonical names ``unet.…``)."""
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="diffusers")
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(tuple(targets)):
            down = torch.randn(rank, mod.in_features, generator=g) * std
            up = torch.randn(mod.out_features, rank, generator=g) * std
            ad.modules[prefix + name] = LoraModule.from_tensors(prefix + name, down, up, alpha=alpha)
    return ad
