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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import sub_block_of, unet_block_resolutions
from ..errors import UsageError
from ..masks import MaskObjective, References, SolveOptions, prior_init
from ..priors import load_priors, priors_from_resolutions
from ..progress import progress_bar
from ..strategies.base import LayerContext
from .base_model import BaseModel
from .lora_layers import LoraSet, attach_loras
from .references import encode_references

TERMS = ("content", "style", "sim", "prior", "cycle", "rev")
MIXED_PRECISION = ("no", "fp16", "bf16")


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
class MaskLoss(nn.Module):
    """Holds the masks (as registered parameters, so accelerate/DDP can wrap it) and computes the loss of a
    :class:`~lora_merge.masks.MaskObjective` through the model.

    ``forward(batch)`` returns the dict of raw terms plus ``total``; disabled terms are absent.
    """

    def __init__(
        self,
        base: BaseModel,
        loras: LoraSet,
        data: _Data,
        objective: MaskObjective,
        roles: dict[str, tuple[str, float]],
    ):
        super().__init__()
        self.masks = nn.ParameterList(loras.mask_parameters())
        self._base = [base]  # not registered: the UNet stays outside the trained module
        self._loras = [loras]
        self._data = [data]
        self.objective = objective
        self.lam = objective.term_weights()
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
                        layers[n].slots[0].mask, layers[n].slots[1].mask, role, self.objective.lambda_hinge
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


def _init_fn(objective: MaskObjective, seed: int, roles: dict[str, tuple[str, float]]):
    """Masks start at 1, except with ``prior_init``: the paper's role-dependent draw
    (:func:`lora_merge.masks.prior_init`), seeded per layer exactly as the weight-space solver."""
    if not (objective.prior_init and roles):
        return None
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def init(name: str, index: int, size: int, ranks: tuple[int, int]) -> torch.Tensor:
        if name not in cache:
            gen = LayerContext(name=name, index=0, seed=seed).generator(objective.init_salt)
            cache[name] = prior_init(ranks[0], ranks[1], roles.get(name, ("neutral", 0.0))[0], gen)
        return cache[name][index].float()

    return init


# ------------------------------------------------------------------------------------------ the loop
def train_masks(
    base: BaseModel,
    adapters: Sequence[Any],
    references: References,
    objective: MaskObjective,
    options: SolveOptions,
    *,
    weights: Sequence[float] | Callable[[str], Sequence[float]] | None = None,
    eval_batches: int = 4,
    keep_attached: bool = False,
) -> TrainResult:
    """Learn the masks of a content (``adapters[0]``) and a style (``adapters[1]``) LoRA jointly through
    ``base``'s UNet, minimizing ``objective`` on ``references``.  The UNet is left unchanged afterwards
    (``keep_attached=True`` returns with the wrapped layers still in place, as ``result.loras``, for
    inspection and tests)."""
    if len(adapters) != 2:
        raise UsageError(f"model mode merges exactly 2 inputs (content, style), got {len(adapters)}")
    references.check_prompts("model mode")
    if options.mixed_precision not in MIXED_PRECISION:
        raise UsageError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}")
    if int(options.batch_size) < 1:
        raise UsageError("--batch-size must be >= 1")
    need_cycle = objective.lambda_cycle > 0 or objective.lambda_rev > 0
    cycle_prompt = references.joint_prompt
    accelerator = _accelerator(options.mixed_precision, base)
    t0 = time.perf_counter()

    names = list(dict.fromkeys(n for ad in adapters for n in ad.modules))
    roles, priors_source = layer_roles(names, objective.priors, base)
    loras = attach_loras(base.unet, adapters, weights=weights, mask_kinds=objective.axis,
                         mask_init=_init_fn(objective, options.seed, roles))  # fmt: skip
    try:
        if not loras.layers:
            raise UsageError("no adapter module is a UNet layer; model mode trains UNet masks only")
        encoded = encode_references(base, references, "model mode")
        data = _Data(
            content=encoded["content"][0],
            style=encoded["style"][0],
            cond={"content": encoded["content"][1], "style": encoded["style"][1],
                  **({"cycle": base.encode_prompt([cycle_prompt])} if need_cycle else {})},
        )  # fmt: skip
        loss = MaskLoss(base, loras, data, objective, roles)
        optimizer = torch.optim.Adam(loss.parameters(), lr=objective.lr)
        loss, optimizer = accelerator.prepare(loss, optimizer)
        eval_set = _eval_batches(data, base, options, eval_batches)
        initial = _evaluate(loss, eval_set, accelerator)
        gen = torch.Generator().manual_seed(options.seed * 1009 + accelerator.process_index + 1)
        history: list[dict[str, float]] = []
        steps = int(objective.steps)
        with progress_bar("training masks", enabled=options.progress and accelerator.is_local_main_process) as bar:
            for step in range(steps):
                batch = _sample(data, base, options.batch_size, gen)
                with accelerator.autocast():
                    terms = loss(batch)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(terms["total"])
                optimizer.step()
                row = {"step": step + 1, **{k: float(v.detach()) for k, v in terms.items()}}
                history.append(row)
                if bar is not None:
                    losses = " ".join(f"{k}={row[k]:.4g}" for k in ("total", *TERMS) if k in row)
                    bar(step + 1, steps, losses)
        final = _evaluate(loss, eval_set, accelerator)
        accelerator.wait_for_everyone()
        masks = loras.masks()
        config = {**objective.describe(), "seed": options.seed, "batch_size": int(options.batch_size),
                  "mixed_precision": options.mixed_precision, "eval_batches": int(eval_batches),
                  "cycle_prompt": cycle_prompt if need_cycle else None}  # fmt: skip
        result = TrainResult(
            masks=masks, history=history, initial=initial, final=final, num_trainable=loras.num_trainable,
            seconds=time.perf_counter() - t0, roles=roles, priors=priors_source, skipped=list(loras.skipped),
            config=config,
            prompts={"content": references.content.prompt, "style": references.style.prompt,
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


def _accelerator(mixed_precision: str, base: BaseModel):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state; a second run in the same process (API use, tests, the
    # benchmark) with another precision must start from a fresh one.  The distributed (partial) state —
    # the processes `accelerate launch` started — is kept.
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    check_precision(mixed_precision, base.device)
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=base.device.type == "cpu")
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"--mixed-precision {mixed_precision}: {exc}".splitlines()[0]) from None


def _eval_batches(data: _Data, base: BaseModel, options: SolveOptions, count: int) -> list[dict[str, torch.Tensor]]:
    """A fixed seeded set of batches on which the objective is measured before and after training."""
    gen = torch.Generator().manual_seed(options.seed * 7919 + 17)
    return [_sample(data, base, options.batch_size, gen) for _ in range(max(0, int(count)))]


def _evaluate(objective: nn.Module, batches: list[dict[str, torch.Tensor]], accelerator) -> dict[str, float]:
    if not batches:
        return {}
    sums: dict[str, float] = {}
    with torch.no_grad(), accelerator.autocast():
        for b in batches:
            for k, v in objective(b).items():
                sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / len(batches) for k, v in sums.items()}
