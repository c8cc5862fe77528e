"""A synthetic SDXL attention LoRA pair (560 linear layers, rank 64) built from the real SDXL UNet
config on the meta device (no weights, no download).  The style LoRA's input directions overlap the
content LoRA's by half.  Shared by the duolora/ziplora benchmark and the comparison script."""
from __future__ import annotations

import torch

SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}  # fmt: skip  (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json)
ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def sdxl_attention_layout() -> dict[str, tuple[int, int]]:
    """``{unet.<module>: (d_out, d_in)}`` for every attention projection of the SDXL UNet."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    out = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(ATTN_TARGETS) and ".attn" in name:
            out[f"unet.{name}"] = (mod.out_features, mod.in_features)
    return out


def synthetic_pair(layout: dict[str, tuple[int, int]], rank: int = 64, overlap: float = 0.5, seed: int = 0):
    """Two in-memory :class:`~lora_merge.Adapter` s on ``layout``; ``overlap`` of the style LoRA's input
    directions are shared with the content LoRA's."""
    from lora_merge.adapter import Adapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    content, style = Adapter(dialect="diffusers"), Adapter(dialect="diffusers")
    k = round(rank * overlap)
    for name, (d_out, d_in) in layout.items():
        r = min(rank, d_in)
        ac = torch.randn(r, d_in, generator=g) / d_in**0.5
        mix = torch.randn(k, k, generator=g) / k**0.5 if k else None
        shared = mix @ ac[:k] if k else ac[:0]
        as_ = torch.cat([shared, torch.randn(r - k, d_in, generator=g) / d_in**0.5])
        bc = torch.randn(d_out, r, generator=g) * 0.02
        bs = torch.randn(d_out, r, generator=g) * 0.02
        content.modules[name] = LoraModule.from_tensors(name, ac, bc, alpha=float(r))
        style.modules[name] = LoraModule.from_tensors(name, as_, bs, alpha=float(r))
    return content, style
