"""The toy world's text-to-image model: a tiny text encoder and an SDXL-shaped diffusers UNet.

The UNet uses SDXL's block types in SDXL's order (``DownBlock2D``, ``CrossAttnDownBlock2D`` ×2,
``UNetMidBlock2DCrossAttn``, ``CrossAttnUpBlock2D`` ×2, ``UpBlock2D``) at 16 → 8 → 4 px, so
``down_blocks.1``/``up_blocks.1`` attend at 8×8 and ``down_blocks.2``/``mid_block``/``up_blocks.0`` at 4×4,
the same two-resolution split SDXL has at 64/32.

The text encoder is a word-level embedding + positions + one transformer layer.  The vocabulary already
contains ``sks`` and ``zkz``; base training never sees them, so their embedding rows keep their seeded
random initialisation (the optimizer gives them neither gradient nor weight decay).  The LoRAs train only
the UNet, so an adapter file alone carries the concept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from ..files import atomic_write, atomic_write_json
from . import world

ARCH = "toyworld"
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "toyworld"

VOCAB: tuple[str, ...] = ("<pad>", "a", "an", "in", "style", "object") + world.SHAPES + world.STYLES
MAX_TOKENS = 8

UNET_CONFIG: dict[str, Any] = {
    "sample_size": world.IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
    # SDXL adds pooled text to the time embedding ("text_time"); "text" is the same idea without SDXL's
    # size conditioning: attention-pooled encoder states → time embedding → every resnet.
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 4,
}
TEXT_CONFIG: dict[str, Any] = {"vocab": list(VOCAB), "dim": 64, "heads": 4, "ff": 128, "max_tokens": MAX_TOKENS}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    # v-prediction: at high noise the target is ≈ -x0, so the coarse layout decided there (the shape)
    # counts in the loss
    "prediction_type": "v_prediction",
    "clip_sample": True,
}


class TextEncoder(nn.Module):
    """Words → ``(B, MAX_TOKENS, dim)`` hidden states (the UNet's ``encoder_hidden_states``)."""

    def __init__(self, vocab: list[str] | tuple[str, ...] = VOCAB, dim: int = 64, heads: int = 4, ff: int = 128,
                 max_tokens: int = MAX_TOKENS):
        super().__init__()
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = max_tokens
        self.embed = nn.Embedding(len(self.vocab), dim)
        self.pos = nn.Parameter(torch.zeros(max_tokens, dim))
        self.layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = p.lower().split()
            if len(words) > self.max_tokens:
                raise UsageError(f"toy-world prompt {p!r} has more than {self.max_tokens} words")
            for j, w in enumerate(words):
                if w not in self.index:
                    raise UsageError(f"toy-world prompt {p!r}: unknown word {w!r} (vocabulary: {' '.join(self.vocab[1:])})")
                ids[i, j] = self.index[w]
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        return self.norm(self.layer(h))


def build_unet(config: dict[str, Any] | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or UNET_CONFIG))


def ddpm_scheduler(config: dict[str, Any] | None = None):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**(config or SCHEDULER_CONFIG))


def ddim_scheduler(config: dict[str, Any] | None = None):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**(config or SCHEDULER_CONFIG), set_alpha_to_one=True)


@dataclass
class ToyWorld:
    """The loaded base model."""

    unet: Any
    text_encoder: TextEncoder
    scheduler: Any
    image_size: int = world.IMAGE_SIZE
    arch: str = ARCH
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    config: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.text_encoder.tokenize(list(prompts)).to(self.device)
        return self.text_encoder(ids)

    def fresh_scheduler(self):
        return ddpm_scheduler(self.config.get("scheduler"))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def base_dir() -> Path:
    return DATA_DIR / "base"


def load_base(device: str | torch.device = "cpu", path: str | Path | None = None) -> ToyWorld:
    """The bundled, trained base model (fp16 on disk, fp32 in memory), in eval mode."""
    from safetensors.torch import load_file

    d = Path(path) if path is not None else base_dir()
    files = [d / "model.json", d / "unet.safetensors", d / "text_encoder.safetensors"]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UsageError(
            f"{missing[0]}: toy-world base model not found (train it with `lora-merge toyworld train-base`)"
        )
    cfg = _read_json(d / "model.json")
    unet = build_unet(cfg["unet"])
    unet.load_state_dict({k: v.float() for k, v in load_file(d / "unet.safetensors").items()})
    te = TextEncoder(**cfg["text_encoder"])
    te.load_state_dict({k: v.float() for k, v in load_file(d / "text_encoder.safetensors").items()})
    dev = torch.device(device)
    unet.to(dev).eval().requires_grad_(False)
    te.to(dev).eval().requires_grad_(False)
    return ToyWorld(unet, te, ddpm_scheduler(cfg["scheduler"]), cfg.get("image_size", world.IMAGE_SIZE), ARCH,
                    dev, cfg)


def save_base(unet, text_encoder: TextEncoder, out: Path, extra: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "arch": ARCH,
        "image_size": world.IMAGE_SIZE,
        "unet": {k: (list(v) if isinstance(v, tuple) else v) for k, v in UNET_CONFIG.items()},
        "text_encoder": TEXT_CONFIG,
        "scheduler": SCHEDULER_CONFIG,
        **(extra or {}),
    }
    # atomic: readers (other processes) never see a half-written file
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    atomic_write(out / "unet.safetensors", lambda fh: fh.write(save(half, metadata={"format": "pt"})))
    te = {k: v.detach().to(torch.float16).contiguous() for k, v in text_encoder.state_dict().items()}
    atomic_write(out / "text_encoder.safetensors", lambda fh: fh.write(save(te, metadata={"format": "pt"})))
    atomic_write_json(out / "model.json", cfg)
