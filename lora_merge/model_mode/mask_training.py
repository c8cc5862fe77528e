"""Train ZipLoRA / DuoLoRA merge masks through the diffusion model (the papers' algorithm).

One step (docs/algorithms.md §5–6), with a content batch ``x_c`` and a style batch ``x_s`` noised with the
SAME noise ``ε`` and timestep ``t``:

* targets without gradient: ``ε_cc`` = content LoRA alone on ``(x_c, p_c)``, ``ε_ss`` = style LoRA alone
  on ``(x_s, p_s)`` (each unmasked, at its merge weight);
* merged predictions ``ε_mc``, ``ε_ms`` (masks on, both LoRAs);
* ``content = MSE(ε_mc, ε_cc)``, ``style = MSE(ε_ms, ε_ss)``;
* ``sim`` = the masks' similarity term, ``prior`` = the DuoLoRA rank prior (layer roles by resolution);
* Constyle: ``ε_cs = style-LoRA(x_c, p_cs)``, ``x̂0`` recovered from it, re-noised with the same ``ε``
  and ``t``, ``ε_csc = style-LoRA(x_cs, p_c)`` → ``cycle = MSE(ε_mc, ε_csc)``; the reverse cycle swaps
  the LoRAs and prompts → ``rev = MSE(ε_ms, ε_scs)``.  Cycle targets have no gradient.

``total = content + style + λ_sim·sim + λ_prior·prior + λ_cycle·cycle + λ_rev·rev``.  A weight of 0
removes its term completely (not computed, not in the total).  Every step counts; there is no early
exit when ``sim`` reaches 0 (a bug of the public code).  Only the masks train (Adam).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import sub_block_of, unet_block_resolutions
from ..errors import UsageError
from ..masks import prior_init
from ..priors import load_priors, priors_from_resolutions
from ..progress import progress_bar
from ..strategies.base import LayerContext
from .base_model import BaseModel
from .images import resolve_images
from .lora_layers import LoraSet, attach_loras

TERMS = ("content", "style", "sim", "prior", "cycle", "rev")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Settings of one mask-training run.  ``strategy`` picks the mask family: ``ziplora`` (one mask value
    per output — or input, ``axis='in'`` — dimension) or ``duolora`` (rank masks, layer priors)."""

    strategy: str = "duolora"
    steps: int = 100
    lr: float = 0.01
    lambda_sim: float = 0.01
    lambda_prior: float = 0.0
    lambda_hinge: float = 1.0
    lambda_cycle: float = 0.0
    lambda_rev: float = 0.0
    axis: str = "out"
    priors: str | None = None
    prior_init: bool = False
    batch_size: int = 1
    seed: int = 0
    mixed_precision: str = "no"
    eval_batches: int = 4
    cycle_prompt: str | None = None

    def validate(self) -> None:
        if self.strategy not in ("ziplora", "duolora"):
            raise UsageError(f"model mode trains 'ziplora' or 'duolora' masks, not {self.strategy!r}")
        if int(self.steps) < 0:
            raise UsageError(f"--steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        for k in ("lambda_sim", "lambda_prior", "lambda_hinge", "lambda_cycle", "lambda_rev"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"--{k.replace('_', '-')} must be a finite number >= 0, got {v}")
        if self.axis not in ("out", "in"):
            raise UsageError(f"--axis must be 'out' or 'in', got {self.axis!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
        if int(self.batch_size) < 1:
            raise UsageError("--batch-size must be >= 1")

    @property
    def mask_kind(self) -> str:
        return "rank" if self.strategy == "duolora" else self.axis

    def weights(self) -> dict[str, float]:
        return {"content": 1.0, "style": 1.0, "sim": self.lambda_sim, "prior": self.lambda_prior,
                "cycle": self.lambda_cycle, "rev": self.lambda_rev}  # fmt: skip


@dataclass
class TrainResult:
    """Learned masks (layer → ``[m_content, m_style]``, fp32 CPU) and what the run measured."""

    masks: dict[str, list[torch.Tensor | None]]
    history: list[dict[str, float]]
    initial: dict[str, float]
    final: dict[str, float]
    num_trainable: int
    seconds: float
    roles: dict[str, tuple[str, float]] = field(default_factory=dict)
    priors: str = "none"
    skipped: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    num_processes: int = 1
    is_main_process: bool = True
    loras: LoraSet | None = None  # the still-attached layers when ``keep_attached=True``

    def report(self) -> dict[str, Any]:
        """JSON-ready summary: config, loss curve, before/after objective, per-block mean masks."""
        blocks: dict[str, list[list[float]]] = {}
        layers = {}
        for name, ms in self.masks.items():
            means = [None if m is None else float(m.mean()) for m in ms]
            layers[name] = {"mean_mask": means, "role": self.roles.get(name)}
            blk = sub_block_of(name) or name
            acc = blocks.setdefault(blk, [[], []])
            for i, v in enumerate(means[:2]):
                if v is not None:
                    acc[i].append(v)
        return {
            "mode": "model",
            "config": self.config,
            "prompts": self.prompts,
            "device": self.device,
            "num_processes": self.num_processes,
            "trainable_values": self.num_trainable,
            "priors": self.priors,
            "seconds": round(self.seconds, 3),
            "steps": len(self.history),
            "objective_before": self.initial,
            "objective_after": self.final,
            "loss_curve": self.history,
            "block_mean_masks": {
                b: {"content": _mean(v[0]), "style": _mean(v[1])} for b, v in sorted(blocks.items())
            },
            "layers": layers,
            "not_trained": self.skipped,
        }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------------------------------ mask terms
# Differentiable (torch) forms of the terms defined in :mod:`lora_merge.masks` (the weight-space solver); the
# tests check that both give the same values.
def similarity_term(mask_c: torch.Tensor, mask_s: torch.Tensor) -> torch.Tensor:
    """``mean_i |m_c(i) · m_s(i)|`` over the paired entries (:func:`lora_merge.masks.similarity`)."""
    k = min(mask_c.shape[0], mask_s.shape[0])
    if k == 0:
        return mask_c.sum() * 0
    return (mask_c[:k] * mask_s[:k]).abs().mean()


def prior_rank_term(
    mask_c: torch.Tensor, mask_s: torch.Tensor, role: str, lambda_hinge: float
) -> torch.Tensor:
    """The paper's relaxed rank constraint with the hinge, per mask entry
    (:func:`lora_merge.masks.prior_rank_term`): content layers ``(‖m_c‖₁ + λ_h·max(0, ‖m_s‖₁ − ‖m_c‖₁))/r̄``,
    style layers mirrored, neutral 0."""
    n = mask_c.numel() + mask_s.numel()
    if role == "neutral" or n == 0:
        return mask_c.sum() * 0
    dom, oth = (mask_c, mask_s) if role == "content" else (mask_s, mask_c)
    nd, no = dom.abs().sum(), oth.abs().sum()
    return (nd + lambda_hinge * torch.relu(no - nd)) / (0.5 * n)


# ------------------------------------------------------------------------------------------ data
@dataclass
class _Data:
    content: torch.Tensor  # N_c × C × h × w latents
    style: torch.Tensor
    cond: dict[str, dict[str, Any]]  # "content", "style", "cycle" → UNet kwargs (batch 1)


def _images(base: BaseModel, images: torch.Tensor | str | os.PathLike, what: str) -> torch.Tensor:
    images = resolve_images(images, base.image_size)
    if images.dim() != 4 or images.shape[1] != 3:
        raise UsageError(f"{what} images must be N×3×H×W, got {tuple(images.shape)}")
    return base.encode_images(images)


def _sample(data: _Data, base: BaseModel, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One batch: content and style latents noised with the same noise and timestep."""
    dev = data.content.device
    ic = torch.randint(0, data.content.shape[0], (batch,), generator=gen)
    is_ = torch.randint(0, data.style.shape[0], (batch,), generator=gen)
    z_c, z_s = data.content[ic.to(dev)], data.style[is_.to(dev)]
    if z_c.shape[1:] != z_s.shape[1:]:
        raise UsageError(
            f"content latents {tuple(z_c.shape[1:])} and style latents {tuple(z_s.shape[1:])} differ"
        )
    noise = torch.randn(z_c.shape, generator=gen).to(dev, z_c.dtype)
    t = torch.randint(0, base.num_train_timesteps, (batch,), generator=gen).to(dev)
    return {
        "x_c": base.add_noise(z_c, noise, t),
        "x_s": base.add_noise(z_s, noise, t),
        "noise": noise,
        "t": t,
    }


# ------------------------------------------------------------------------------------------ objective
class MaskObjective(nn.Module):
    """Holds the masks (as registered parameters, so accelerate/DDP can wrap it) and computes the loss.

    ``forward(batch)`` returns the dict of raw terms plus ``total``; disabled terms are absent.
    """

    def __init__(
        self,
        base: BaseModel,
        loras: LoraSet,
        data: _Data,
        cfg: TrainConfig,
        roles: dict[str, tuple[str, float]],
    ):
        super().__init__()
        self.masks = nn.ParameterList(loras.mask_parameters())
        self._base = [base]  # not registered: the UNet stays outside the trained module
        self._loras = [loras]
        self._data = [data]
        self.cfg = cfg
        self.lam = cfg.weights()
        self._pairs_names = [
            n for n, layer in loras.layers.items() if all(s.mask is not None for s in layer.slots)
        ]
        self._prior_layers = [(n, roles[n][0], roles[n][1]) for n in self._pairs_names
                              if n in roles and roles[n][0] != "neutral"]  # fmt: skip

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        layers = self._loras[0].layers
        return [(layers[n].slots[0].mask, layers[n].slots[1].mask) for n in self._pairs_names]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        base, loras, data, lam = self._base[0], self._loras[0], self._data[0], self.lam
        x_c, x_s, noise, t = batch["x_c"], batch["x_s"], batch["noise"], batch["t"]
        c_c, c_s = data.cond["content"], data.cond["style"]
        terms: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            with loras.only(0):
                e_cc = base.predict(x_c, t, c_c)
            with loras.only(1):
                e_ss = base.predict(x_s, t, c_s)
            e_csc = e_scs = None
            if lam["cycle"] > 0:  # content image → add style → remove style
                with loras.only(1):
                    e_cs = base.predict(x_c, t, data.cond["cycle"])
                    x_cs = base.add_noise(base.predict_x0(x_c, e_cs, t), noise, t)
                    e_csc = base.predict(x_cs, t, c_c)
            if lam["rev"] > 0:  # style image → add content → remove content
                with loras.only(0):
                    e_sc = base.predict(x_s, t, data.cond["cycle"])
                    x_sc = base.add_noise(base.predict_x0(x_s, e_sc, t), noise, t)
                    e_scs = base.predict(x_sc, t, c_s)
        with loras.configured((1.0, 1.0), use_masks=True):
            e_mc = base.predict(x_c, t, c_c).float()
            e_ms = base.predict(x_s, t, c_s).float()
        terms["content"] = F.mse_loss(e_mc, e_cc.float())
        terms["style"] = F.mse_loss(e_ms, e_ss.float())
        if lam["sim"] > 0 and self._pairs_names:  # mean over layers
            terms["sim"] = torch.stack([similarity_term(mc, ms) for mc, ms in self._pairs()]).mean()
        if lam["prior"] > 0 and self._prior_layers:  # mean over layers, each weighted by its prior score
            layers = self._loras[0].layers
            terms["prior"] = torch.stack(
                [
                    score
                    * prior_rank_term(
                        layers[n].slots[0].mask, layers[n].slots[1].mask, role, self.cfg.lambda_hinge
                    )
                    for n, role, score in self._prior_layers
                ]
            ).sum() / len(self._pairs_names)
        if e_csc is not None:
            terms["cycle"] = F.mse_loss(e_mc, e_csc.float())
        if e_scs is not None:
            terms["rev"] = F.mse_loss(e_ms, e_scs.float())
        terms["total"] = sum(lam[k] * v for k, v in terms.items())
        return terms


# ------------------------------------------------------------------------------------------ roles / init
def native_size(unet: nn.Module) -> int:
    """The UNet's native latent side length (``config.sample_size``)."""
    size = unet.config.sample_size
    return int(size if isinstance(size, int) else size[0])


def layer_roles(
    names: Sequence[str], priors: str | None, base: BaseModel
) -> tuple[dict[str, tuple[str, float]], str]:
    """Each layer's prior ``(role, score)`` and the table's description.  ``auto``: the paper's rule
    (content where the latent resolution is at most a quarter of the native one, else style) on this
    model's own block resolutions; ``none``: no priors; else :func:`lora_merge.priors.load_priors`."""
    if priors in (None, "none"):
        return {}, "none"
    if priors == "auto":
        table = priors_from_resolutions(str(base.arch or "unet"), unet_block_resolutions(base.unet),
                                        native_size(base.unet))
    else:  # a spec, or a LayerPriors object (``--priors measure``, measured by the strategy)
        table = load_priors(priors, base.arch) if isinstance(priors, str) else priors
    out = {}
    for n in names:
        role = str(table.role_of(n))
        out[n] = (role, float(table.score_of(n)) if role != "neutral" else 0.0)
    return out, table.source or str(priors)


def _init_fn(cfg: TrainConfig, roles: dict[str, tuple[str, float]]):
    """Masks start at 1, except DuoLoRA with ``prior_init``: the paper's role-dependent draw
    (:func:`lora_merge.masks.prior_init`), seeded per layer exactly as the weight-space ``duolora``."""
    if not (cfg.strategy == "duolora" and cfg.prior_init and roles):
        return None
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def init(name: str, index: int, size: int, ranks: tuple[int, int]) -> torch.Tensor:
        if name not in cache:
            gen = LayerContext(name=name, index=0, seed=cfg.seed).generator("duolora-prior-init")
            cache[name] = prior_init(ranks[0], ranks[1], roles.get(name, ("neutral", 0.0))[0], gen)
        return cache[name][index].float()

    return init


# ------------------------------------------------------------------------------------------ the loop
def train_masks(
    base: BaseModel,
    adapters: Sequence[Any],
    *,
    content_images: torch.Tensor | str | os.PathLike,
    content_prompt: str,
    style_images: torch.Tensor | str | os.PathLike,
    style_prompt: str,
    config: TrainConfig | None = None,
    weights: Sequence[float] | Callable[[str], Sequence[float]] | None = None,
    progress: bool = False,
    keep_attached: bool = False,
) -> TrainResult:
    """Learn the masks of a content (``adapters[0]``) and a style (``adapters[1]``) LoRA jointly through
    ``base``'s UNet.  The UNet is left unchanged afterwards (``keep_attached=True`` returns with the
    wrapped layers still in place, as ``result.loras``, for inspection and tests)."""
    cfg = config or TrainConfig()
    cfg.validate()
    if len(adapters) != 2:
        raise UsageError(f"model mode merges exactly 2 inputs (content, style), got {len(adapters)}")
    for what, p in (("content", content_prompt), ("style", style_prompt)):
        if not p or not str(p).strip():
            raise UsageError(f"model mode needs a {what} prompt (--{what}-prompt)")
    need_cycle = cfg.lambda_cycle > 0 or cfg.lambda_rev > 0
    cycle_prompt = cfg.cycle_prompt or f"{content_prompt} {style_prompt}"
    accelerator = _accelerator(cfg, base)
    t0 = time.perf_counter()

    names = list(dict.fromkeys(n for ad in adapters for n in ad.modules))
    roles, priors_source = layer_roles(names, cfg.priors, base) if cfg.strategy == "duolora" else ({}, "none")
    loras = attach_loras(base.unet, adapters, weights=weights, mask_kinds=cfg.mask_kind,
                         mask_init=_init_fn(cfg, roles))  # fmt: skip
    try:
        if not loras.layers:
            raise UsageError("no adapter module is a UNet layer; model mode trains UNet masks only")
        data = _Data(
            content=_images(base, content_images, "content"),
            style=_images(base, style_images, "style"),
            cond={"content": base.encode_prompt([content_prompt]),
                  "style": base.encode_prompt([style_prompt]),
                  **({"cycle": base.encode_prompt([cycle_prompt])} if need_cycle else {})},
        )  # fmt: skip
        objective = MaskObjective(base, loras, data, cfg, roles)
        optimizer = torch.optim.Adam(objective.parameters(), lr=cfg.lr)
        objective, optimizer = accelerator.prepare(objective, optimizer)
        eval_set = _eval_batches(data, base, cfg)
        initial = _evaluate(objective, eval_set, accelerator)
        gen = torch.Generator().manual_seed(cfg.seed * 1009 + accelerator.process_index + 1)
        history: list[dict[str, float]] = []
        with progress_bar("training masks", enabled=progress and accelerator.is_local_main_process) as bar:
            for step in range(int(cfg.steps)):
                batch = _sample(data, base, cfg.batch_size, gen)
                with accelerator.autocast():
                    terms = objective(batch)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(terms["total"])
                optimizer.step()
                row = {"step": step + 1, **{k: float(v.detach()) for k, v in terms.items()}}
                history.append(row)
                if bar is not None:
                    losses = " ".join(f"{k}={row[k]:.4g}" for k in ("total", *TERMS) if k in row)
                    bar(step + 1, int(cfg.steps), losses)
        final = _evaluate(objective, eval_set, accelerator)
        accelerator.wait_for_everyone()
        masks = loras.masks()
        result = TrainResult(
            masks=masks, history=history, initial=initial, final=final, num_trainable=loras.num_trainable,
            seconds=time.perf_counter() - t0, roles=roles, priors=priors_source, skipped=list(loras.skipped),
            config={**asdict(cfg), "cycle_prompt": cycle_prompt if need_cycle else None},
            prompts={"content": content_prompt, "style": style_prompt,
                     **({"cycle": cycle_prompt} if need_cycle else {})},
            device=str(accelerator.device), num_processes=accelerator.num_processes,
            is_main_process=accelerator.is_main_process,
        )  # fmt: skip
        if keep_attached:
            result.loras = loras
        return result
    finally:
        if not keep_attached:
            loras.detach()


def check_precision(mixed_precision: str, device: torch.device | str) -> None:
    """fp16 autocast needs a GPU (accelerate would silently train in fp32 on CPU); bf16 works on both."""
    if mixed_precision == "fp16" and torch.device(device).type == "cpu":
        raise UsageError("--mixed-precision fp16 needs a GPU (--device cuda); on CPU use bf16 or no")


def _accelerator(cfg: TrainConfig, base: BaseModel):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state; a second run in the same process (API use, tests, the
    # benchmark) with another precision must start from a fresh one.  The distributed (partial) state —
    # the processes `accelerate launch` started — is kept.
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    check_precision(cfg.mixed_precision, base.device)
    try:
        return Accelerator(mixed_precision=cfg.mixed_precision, cpu=base.device.type == "cpu")
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--mixed-precision {cfg.mixed_precision}: {exc}".splitlines()[0]) from None


def _eval_batches(data: _Data, base: BaseModel, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
    """A fixed seeded set of batches on which the objective is measured before and after training."""
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
    return [_sample(data, base, cfg.batch_size, gen) for _ in range(max(0, int(cfg.eval_batches)))]


def _evaluate(objective: nn.Module, batches: list[dict[str, torch.Tensor]], accelerator) -> dict[str, float]:
    if not batches:
        return {}
    sums: dict[str, float] = {}
    with torch.no_grad(), accelerator.autocast():
        for b in batches:
            for k, v in objective(b).items():
                sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / len(batches) for k, v in sums.items()}
