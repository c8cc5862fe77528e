"""Training the toy world from scratch: base model, content/style LoRAs, judge.  All seeded.

Run through ``lora-merge toyworld train-base | train-loras | train-judge``; the shipped package data was
produced by exactly those commands with their defaults on a 2-core CPU.
"""
from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import save
from ..adapter import Adapter, LoraModule
from ..arch import ATTENTION_TARGETS
from . import world
from .model import DATA_DIR, TextEncoder, build_unet, ddpm_scheduler, load_base, save_base

Log = Callable[[str], None]


def _seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def base_caption(shape: str, style: str, u: float) -> str:
    """Caption mix for base training: mostly full captions, some partial, some empty (for guidance)."""
    if u < 0.80:
        return world.caption(shape, style)
    if u < 0.88:
        return world.caption(shape, None)
    if u < 0.95:
        return world.caption(None, style)
    return ""


def _pool(combos: list[tuple[str, str]], per_combo: int, salt: str) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    imgs, labels = [], []
    for shape, style in combos:
        for i in range(per_combo):
            imgs.append(world.render(shape, style, world.seed_for(salt, shape, style, i)))
            labels.append((shape, style))
    return torch.stack(imgs), labels


def _cosine_lr(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))


def diffusion_loss(unet, scheduler, x0: torch.Tensor, cond: torch.Tensor, g: torch.Generator,
                   min_snr_gamma: float | None = None) -> torch.Tensor:
    """MSE against the scheduler's target (ε or v); with ``min_snr_gamma`` weighted by Min-SNR-γ (Hang et
    al. 2023: ``min(SNR, γ)/SNR`` for ε, ``min(SNR, γ)/(SNR + 1)`` for v), which moves weight to the noisy
    steps where the coarse layout (the shape) is decided."""
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
    xt = scheduler.add_noise(x0, noise, t)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(x0, noise, t) if v_pred else noise
    pred = unet(xt, t, encoder_hidden_states=cond).sample
    if min_snr_gamma is None:
        return F.mse_loss(pred, target)
    ab = scheduler.alphas_cumprod[t].float()
    snr = ab / (1 - ab)
    w = torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v_pred else snr)
    return (w * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()


def train_base(out: Path = DATA_DIR / "base", steps: int = 1200, batch: int = 48, lr: float = 2e-3, seed: int = 0,
               ema_decay: float = 0.995, checkpoint_every: int = 100, log: Log = print) -> Path:
    """Train text encoder + UNet from scratch on seen shapes × seen styles; write fp16 EMA weights to ``out``.

    One thread: on a shared, oversubscribed 2-core box two intra-op threads were measured 8× slower."""
    torch.set_num_threads(1)
    g = _seed_all(seed)
    combos = [(s, t) for s in world.SEEN_SHAPES for t in world.SEEN_STYLES]
    images, labels = _pool(combos, 300, "base")
    unet = build_unet()
    te = TextEncoder()
    sched = ddpm_scheduler()
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "weight_decay": 1e-2},
            # no decay on the embedding: rows of words never seen (sks, zkz) must stay at their random init
            {"params": [te.embed.weight], "weight_decay": 0.0},
            {"params": [p for n, p in te.named_parameters() if n != "embed.weight"], "weight_decay": 1e-2},
        ],
        lr=lr,
    )
    params = list(unet.parameters()) + list(te.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _cosine_lr(step, steps, 100)
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        us = torch.rand(batch, generator=g).tolist()
        x0 = images[idx]
        prompts = [base_caption(*labels[i], u) for i, u in zip(idx.tolist(), us)]
        cond = te(te.tokenize(prompts))
        loss = diffusion_loss(unet, sched, x0, cond, g, min_snr_gamma=5.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_mul_(ema_params, d)
            torch._foreach_add_(ema_params, params, alpha=1 - d)
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step}/{steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s")
        if (step + 1) % checkpoint_every == 0 or step == steps - 1:
            save_base(ema_unet, ema_te, out, {"training": {"steps": step + 1, "of": steps, "batch": batch, "lr": lr,
                                                           "seed": seed, "ema_decay": ema_decay}})
            log(f"checkpoint at step {step + 1} -> {out}")
    return out


# ------------------------------------------------------------------------------------------- LoRAs
LORA_RANK = 8
#: the recipes' defaults (docs/toyworld.md "The LoRAs"): chosen so that every LoRA alone is judged ≥ 90 %
#: on its concept at scale 1.0 and ≥ 60 % at 0.6 (printed by ``lora-merge bench quality``)
CONTENT_IMAGES = 6
CONTENT_STEPS = 2000
CONTENT_LR = 2e-3
STYLE_STEPS = 1000
STYLE_LR = 1e-3
LORA_BATCH = 16
#: the suite's LoRA files, one per held-out concept, under ``data/toyworld/loras/``
LORA_DIR = DATA_DIR / "loras"


def lora_file(word: str) -> str:
    return f"{word}.safetensors"


def content_training_set(word: str, n: int = CONTENT_IMAGES, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """DreamBooth: ``n`` photos of the subject in its one seen style, every one captioned ``a <word> object``."""
    if word not in world.SUBJECTS:
        raise ValueError(f"{word!r} is not a toy-world subject ({', '.join(world.SUBJECTS)})")
    imgs = [world.render(word, world.SUBJECTS[word], world.seed_for("ref", seed, word, i)) for i in range(n)]
    return torch.stack(imgs), [world.caption(word, None)] * n


def style_reference(word: str, seed: int = 0) -> tuple[torch.Tensor, str]:
    """StyleDrop: the one reference image of the style (its one seen shape) and its caption."""
    if word not in world.STYLE_CONCEPTS:
        raise ValueError(f"{word!r} is not a toy-world style ({', '.join(world.STYLE_CONCEPTS)})")
    shape = world.STYLE_CONCEPTS[word]
    return world.render(shape, word, world.seed_for("ref", seed, word, 0)), world.caption(shape, word)


def styledrop_augment(image: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` augmented copies of one reference image: ±1 px shifts (the background is uniform and the shape
    has a margin, so a roll is a translation) and ±5 % brightness.  No flips: a mirrored ``zkz`` has its
    stripes the other way, a different style."""
    out = []
    for _ in range(n):
        x = image
        dy, dx = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
        b = 1.0 + 0.1 * (float(torch.rand((), generator=g)) - 0.5)
        out.append((((x + 1) / 2) * b).clamp(0, 1) * 2 - 1)
    return torch.stack(out)


def style_training_set(word: str, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """The StyleDrop training set: ``n`` augmentations of the one reference image, all with its caption."""
    ref, cap = style_reference(word, seed)
    g = torch.Generator().manual_seed(world.seed_for("styledrop", seed, word))
    return styledrop_augment(ref, n, g), [cap] * n


def lora_training_set(concept: str, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """The training set of the LoRA of ``concept``: a subject or style word, or "content"/"style" for the
    bundled default pair's (sks, zkz)."""
    word = {"content": world.CONTENT_WORD, "style": world.STYLE_WORD}.get(concept, concept)
    if word in world.SUBJECTS:
        return content_training_set(word, CONTENT_IMAGES if n is None else n, seed)
    if word in world.STYLE_CONCEPTS:
        return style_training_set(word, 64 if n is None else n, seed)
    raise ValueError(f"concept must be a toy-world subject or style word, 'content' or 'style', not {concept!r}")


def peft_to_adapter(state: dict[str, torch.Tensor], alpha: float, metadata: dict[str, str]):
    """PEFT's ``get_peft_model_state_dict`` of the UNet → a lora-merge Adapter with ``unet.``-prefixed names."""
    ad = Adapter(metadata=dict(metadata), dialect="diffusers")
    downs = {k[: -len(".lora_A.weight")]: v for k, v in state.items() if k.endswith(".lora_A.weight")}
    for mod, down in sorted(downs.items()):
        up = state[mod + ".lora_B.weight"]
        name = "unet." + mod
        ad.modules[name] = LoraModule.from_tensors(name, down.detach().float().clone(), up.detach().float().clone(),
                                                   alpha=alpha)
    return ad


def train_lora(word: str, out: Path = LORA_DIR, steps: int | None = None, batch: int = LORA_BATCH,
               lr: float | None = None, seed: int = 0, log: Log = print) -> Path:
    """The recipe's PEFT LoRA of one held-out concept (rank 8, every attention's to_q/k/v/out.0) on the
    frozen base UNet: DreamBooth for a subject, StyleDrop for a style (docs/toyworld.md)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    is_content = word in world.SUBJECTS
    if not is_content and word not in world.STYLE_CONCEPTS:
        raise ValueError(f"{word!r} is not a toy-world subject or style")
    steps = steps if steps is not None else (CONTENT_STEPS if is_content else STYLE_STEPS)
    lr = lr if lr is not None else (CONTENT_LR if is_content else STYLE_LR)
    torch.set_num_threads(1)
    g = _seed_all(seed)
    base = load_base()
    unet = copy.deepcopy(base.unet)
    cfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(ATTENTION_TARGETS), init_lora_weights=True)
    unet = inject_adapter_in_model(cfg, unet)
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    unet.train()
    if is_content:
        images, captions = content_training_set(word, CONTENT_IMAGES, seed)
    else:
        ref, cap = style_reference(word, seed)
        images, captions = ref[None], [cap]
    cond = base.encode_prompt(captions[:1])  # one caption per LoRA
    sched = ddpm_scheduler(base.config.get("scheduler"))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        if is_content:
            x0 = images[torch.randint(0, images.shape[0], (batch,), generator=g)]
        else:  # fresh augmentations of the one reference image every step
            x0 = styledrop_augment(images[0], batch, g)
        loss = diffusion_loss(unet, sched, x0, cond.expand(batch, -1, -1), g, min_snr_gamma=5.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"{word} LoRA step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    state = get_peft_model_state_dict(unet)
    kind = "content" if is_content else "style"
    md = {
        "modelspec.architecture": "lora-merge/toyworld",
        "modelspec.title": f"toy-world {kind} LoRA ({captions[0]!r})",
        "lora_merge.toyworld.concept": kind,
        "lora_merge.toyworld.word": word,
        "lora_merge.toyworld.training": json.dumps({
            "recipe": "dreambooth" if is_content else "styledrop", "steps": steps, "batch": batch, "lr": lr,
            "seed": seed, "images": int(images.shape[0]), "caption": captions[0], "rank": LORA_RANK}),
    }
    ad = peft_to_adapter(state, float(LORA_RANK), md)
    out.mkdir(parents=True, exist_ok=True)
    written = save(ad, out / lora_file(word), to="diffusers", dtype=torch.float16, force=True, metadata=md)
    log(f"wrote {written} ({len(ad)} modules, {ad.num_params} values, {time.time() - t0:.0f}s)")
    return Path(written)
