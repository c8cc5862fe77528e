"""DuoLoRA mask training on the real SDXL UNet (random weights) on one GPU: seconds per step, minutes for
100 steps, peak GPU memory.

The SDXL base UNet is built from its config (below, ``SDXL_UNET_CONFIG``: stabilityai/stable-diffusion-xl-
base-1.0 ``unet/config.json``) with random weights — nothing is downloaded — and checked to have SDXL's
2,567,463,684 parameters.  Two random rank-64 LoRAs (the DuoLoRA paper's rank) go on every attention
projection (``attn1``/``attn2`` × ``to_q``/``to_k``/``to_v``/``to_out.0``: 560 layers), and the package's
model-mode code (``lora_merge.model_mode.mask_training.train_masks``, configured from the ``duolora``
strategy's declared defaults exactly as ``--mode model`` does: ZipRank masks, priors by resolution, prior
initialization, Constyle in both directions) trains their masks for ``--steps`` steps at ``--resolution``
px (1024: latents 4 × 128 × 128), batch 1.

What is random, and why it does not change the cost: the UNet weights, the LoRA factors, the reference
"images", the prompt embeddings (seeded per prompt: ``77 × 2048`` hidden states, a 1280-d pooled
embedding, SDXL's six size/crop time ids) and the image encoder (a fixed 8× average pool and 3 → 4
channel mix standing in for the VAE, which model mode runs once before training, never per step).  Every
UNet pass, mask, loss term and optimizer step is the real one.

On the GPU (the command docs/benchmarks.md gives)::

    python benchmarks/sdxl_duolora_gpu.py --device cuda --dtype bf16 --steps 100 --resolution 1024 \
        --json sdxl_duolora_gpu.json

A tiny SDXL-shaped UNet exercises the same path on CPU in seconds (tests/test_model_mode_cost.py)::

    python benchmarks/sdxl_duolora_gpu.py --config tiny --device cpu --dtype fp32 --steps 2 --resolution 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_mode_cost import StepTimer, mask_config

from lora_merge.adapter import Adapter, LoraModule
from lora_merge.arch import ATTENTION_TARGETS
from lora_merge.masks import Concept, References
from lora_merge.model_mode.base_model import BaseModel
from lora_merge.model_mode.mask_training import train_masks

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (every field; diffusers' defaults written out)
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
#: the same pipeline's scheduler/scheduler_config.json (the fields DDPMScheduler takes)
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
#: parameters of the SDXL base UNet
SDXL_UNET_PARAMS = 2_567_463_684

#: SDXL's layout scaled down: the same block types, text_time conditioning and two attention resolutions
TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "attention_head_dim": [2, 4, 8],
    "block_out_channels": [16, 32, 32],
    "cross_attention_dim": 32,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "addition_time_embed_dim": 8,
    "addition_embed_type_num_heads": 4,
    "projection_class_embeddings_input_dim": 16 + 6 * 8,  # pooled text (16) + six time ids × 8
    "sample_size": 8,
    "transformer_layers_per_block": [1, 1, 2],
}

#: name → (UNet config, pooled text width, prompt tokens, default resolution in px, default LoRA rank)
CONFIGS: dict[str, tuple[dict[str, Any], int, int, int, int]] = {
    "sdxl": (SDXL_UNET_CONFIG, 1280, 77, 1024, 64),
    "tiny": (TINY_UNET_CONFIG, 16, 8, 64, 4),
}
VAE_FACTOR = 8
CONTENT_PROMPT, STYLE_PROMPT, CYCLE_PROMPT = "a photo of sks dog", "a cat in zkz style", "a sks dog in zkz style"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of the UNet ``config`` describes (built on the meta device: no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return sum(p.numel() for p in unet.parameters())


def _prompt_seed(prompt: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt}".encode()).digest()[:7], "little")


def sdxl_base_model(config: str = "sdxl", resolution: int | None = None, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> BaseModel:
    """A model-mode :class:`BaseModel` around the SDXL-layout UNet ``config`` with random weights (built on
    ``device`` directly), SDXL's DDPM scheduler, seeded per-prompt SDXL conditioning and an 8× pooling
    stand-in for the VAE; ``image_size`` is ``resolution``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    unet_cfg, pooled, tokens, default_res, _rank = CONFIGS[config]
    resolution = int(resolution or default_res)
    if resolution % (VAE_FACTOR * 4):
        raise SystemExit(f"--resolution must be a multiple of {VAE_FACTOR * 4}, got {resolution}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    with dev:
        unet = UNet2DConditionModel(**unet_cfg)
    if dtype != torch.float32:
        unet = unet.to(dtype)
    unet.eval().requires_grad_(False)
    hidden = int(unet_cfg["cross_attention_dim"])
    mix = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed + 1)) / 3**0.5

    def encode_prompt(prompts: list[str]) -> dict[str, Any]:
        hs, pools = [], []
        for p in prompts:
            g = torch.Generator().manual_seed(_prompt_seed(p, seed))
            hs.append(torch.randn(tokens, hidden, generator=g))
            pools.append(torch.randn(pooled, generator=g))
        n = len(prompts)
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
        return {"encoder_hidden_states": torch.stack(hs).to(dev),
                "added_cond_kwargs": {"text_embeds": torch.stack(pools).to(dev),
                                      "time_ids": time_ids.expand(n, 6).to(dev)}}  # fmt: skip

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("oc,nchw->nohw", mix, F.avg_pool2d(images.float(), VAE_FACTOR))
        return (z / z.std().clamp_min(1e-6)).to(dev)  # about unit variance, like SDXL's scaled latents

    return BaseModel(unet=unet, scheduler=DDPMScheduler(**SDXL_SCHEDULER_CONFIG), arch="sdxl",
                     image_size=resolution, encode_prompt_fn=encode_prompt, encode_images_fn=encode_images,
                     name=f"{config} (random weights)", device=dev, dtype=dtype)  # fmt: skip


def random_lora(unet: torch.nn.Module, rank: int, seed: int, targets=ATTENTION_TARGETS) -> Adapter:
    """A random LoRA (alpha = rank) on every attention projection of ``unet``: ``A ~ N(0, 1/d_in)``,
    ``B ~ N(0, 0.02²)``, so each update is a modest perturbation of a random layer."""
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="diffusers")
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".attn" in name and name.endswith(tuple(targets)):
            down = torch.randn(rank, mod.in_features, generator=g) / mod.in_features**0.5
            up = torch.randn(mod.out_features, rank, generator=g) * 0.02
            ad.modules["unet." + name] = LoraModule.from_tensors("unet." + name, down, up, alpha=float(rank))
    return ad


def reference_images(n: int, resolution: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sdxl",
                    help="sdxl: the real SDXL base UNet (2.567 B parameters); tiny: SDXL's layout scaled down")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="UNet dtype; bf16/fp16 also train under accelerate autocast (--mixed-precision)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of seconds per step")
    ap.add_argument("--resolution", type=int, default=None, help="image side in px (default: 1024 for sdxl)")
    ap.add_argument("--rank", type=int, default=None, help="LoRA rank (default: 64 for sdxl, the paper's; 4 for tiny)")
    ap.add_argument("--no-constyle", action="store_true", help="lambda_cycle = 0 (no Constyle cycles)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (a step's time is the interval between two optimizer steps)")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available (use --config tiny --device cpu for a dry run)")
    dtype = DTYPES[args.dtype]
    args.rank = args.rank or CONFIGS[args.config][4]

    expected = SDXL_UNET_PARAMS if args.config == "sdxl" else None
    t0 = time.perf_counter()
    base = sdxl_base_model(args.config, args.resolution, args.device, dtype, args.seed)
    n_params = sum(p.numel() for p in base.unet.parameters())
    if expected is not None and abs(n_params - expected) > 0.001 * expected:
        raise SystemExit(f"the UNet has {n_params:,} parameters, SDXL's has {expected:,}: wrong config")
    adapters = [random_lora(base.unet, args.rank, args.seed + 10), random_lora(base.unet, args.rank, args.seed + 20)]
    build_s = time.perf_counter() - t0
    res = base.image_size
    lat = res // VAE_FACTOR
    print(f"config: {args.config} UNet, {n_params:,} parameters ({n_params / 1e9:.3f} B"
          + (f"; SDXL base: {SDXL_UNET_PARAMS / 1e9:.3f} B)" if expected else ")"), flush=True)
    print(f"loras: 2 × rank {args.rank} on {len(adapters[0].modules)} attention projections", flush=True)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {dev} ({gpu}), dtype {args.dtype}, {res} px (latents 4×{lat}×{lat}), batch 1, "
          f"built in {build_s:.1f} s", flush=True)

    overrides = {"lambda_cycle": 0.0} if args.no_constyle else {}
    mixed = "no" if dtype == torch.float32 else args.dtype
    objective, options = mask_config("duolora", overrides, steps=args.steps, mixed_precision=mixed, seed=args.seed,
                                     device=dev)
    content = reference_images(4, res, args.seed + 1)
    style = reference_images(4, res, args.seed + 2)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    every = max(1, args.steps // 10)
    with StepTimer(dev, print_every=every) as timer:
        refs = References(Concept(content, CONTENT_PROMPT), Concept(style, STYLE_PROMPT), CYCLE_PROMPT)
        result = train_masks(base, adapters, refs, objective, options)
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    per_step = timer.step_seconds()  # steps 2..N
    warm = min(max(args.warmup, 1), args.steps - 1)  # step 1 has no interval; keep at least one step
    timed = per_step[warm - 1:]
    sec = statistics.median(timed)
    last = result.history[-1] if result.history else {}
    terms = sorted(k for k in last if k != "step")
    out = {
        "config": args.config, "unet_parameters": n_params, "device": str(dev), "device_name": gpu,
        "dtype": args.dtype, "mixed_precision": mixed, "resolution": res, "latent": [4, lat, lat], "batch": 1,
        "rank": args.rank, "lora_layers": len(adapters[0].modules), "constyle": not args.no_constyle,
        "steps": args.steps, "warmup_steps": warm, "timed_steps": len(timed),
        "seconds_per_step": sec, "seconds_per_step_mean": statistics.fmean(timed),
        "total_minutes_100_steps": sec * 100 / 60, "wall_minutes": result.seconds / 60,
        "peak_gpu_memory_gib": None if peak is None else peak / 2**30,
        "trainable_values": result.num_trainable, "loss_terms": terms,
        "final_total": last.get("total"), "command": "python benchmarks/sdxl_duolora_gpu.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
    }  # fmt: skip
    print(f"loss terms: {', '.join(terms)}; total {out['final_total']:.4g} at step {args.steps}", flush=True)
    print(f"trainable_values: {result.num_trainable:,}")
    print(f"seconds_per_step: {sec:.4f} (median of steps {warm + 1}-{args.steps}; mean {out['seconds_per_step_mean']:.4f})")
    print(f"total_minutes_100_steps: {out['total_minutes_100_steps']:.2f} (100 × seconds_per_step)")
    print(f"wall_minutes: {out['wall_minutes']:.2f} (this run's whole train_masks call: {args.steps} steps, setup, "
          "before/after objective on 2 × 4 batches)")
    print("peak_gpu_memory_gib: " + ("n/a (not a CUDA device)" if peak is None
                                     else f"{out['peak_gpu_memory_gib']:.2f} (torch.cuda.max_memory_allocated)"))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
