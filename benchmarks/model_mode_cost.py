"""Model-mode cost: one mask-training step against one plain LoRA training step, same UNet, same batch.

Cases, measured alternately in every round:

* ``plain``: one LoRA training step — a PEFT LoRA (the content LoRA's rank, on the same attention
  projections) on a copy of the same UNet, the standard diffusion loss (MSE against the scheduler's target,
  ε or v) on a content batch, backward, ``AdamW.step()``;
* ``ziplora``, ``duolora`` (``lambda_cycle`` = 0: no Constyle), ``duolora+constyle`` (both cycles on, the
  strategy's default): one step of ``lora_merge.model_mode.mask_training.train_masks`` — the package's own
  loop, configured from the strategy's declared defaults exactly as ``--mode model`` does
  (the strategy's ``mask_objective()`` and ``SolveOptions.from_config``).  A step's time is the interval between two consecutive
  optimizer steps of that loop (a ``torch.optim`` step post-hook; on CUDA it synchronizes first), so it holds
  the batch sampling, every UNet pass, the loss terms, backward and ``Adam.step()`` and nothing of the
  run's setup or its before/after evaluation.

Each case runs ``--steps`` steps per round; its round value is the median of steps 3..N (steps 1 and 2
are warm-up on both sides).  Ratios are case ÷ plain of the same round,
then the median over ``--rounds`` rounds; the case order rotates each round.

    OMP_NUM_THREADS=1 python benchmarks/model_mode_cost.py --threads 1 --json docs/model-mode-cost.json

``--config``: ``toyworld`` (default: the bundled toy world's trained UNet and LoRAs, 16 px),
``tiny`` (lora_merge.model_mode.tiny's random UNet, 8 px), ``sdxl-tiny`` (SDXL's layout scaled down, from
benchmarks/sdxl_duolora_gpu.py) or ``sdxl`` (the real SDXL UNet with random weights; a GPU job).
No speed target is asserted anywhere; tests/test_model_mode_cost.py only runs it tiny.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_merge.arch import ATTENTION_TARGETS
from lora_merge.masks import Concept, MaskObjective, References, SolveOptions
from lora_merge.model_mode.base_model import BaseModel
from lora_merge.model_mode.mask_training import train_masks
from lora_merge.strategies import get_strategy

#: label → (strategy, parameter overrides); everything else is the strategy's declared default
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ziplora": ("ziplora", {}),
    "duolora": ("duolora", {"lambda_cycle": 0.0}),
    "duolora+constyle": ("duolora", {}),
}
#: UNet passes per step: (without gradient, with gradient)
PASSES = {"plain": (0, 1), "ziplora": (2, 2), "duolora": (2, 2), "duolora+constyle": (6, 2)}
CONFIGS = ("toyworld", "tiny", "sdxl-tiny", "sdxl")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------ shared helpers
def mask_config(strategy: str, overrides: dict[str, Any], *, steps: int, mixed_precision: str = "no",
                batch_size: int = 1, seed: int = 0, device: Any = "cpu") -> tuple[MaskObjective, SolveOptions]:
    """The objective and solver options ``--strategy STRATEGY --mode model`` would train with (the
    strategy's declared defaults, ``overrides`` applied)."""
    params = {**overrides, "steps": steps, "mixed_precision": mixed_precision, "batch_size": batch_size}
    strat = get_strategy(strategy)(mode="model", **params)
    options = SolveOptions.from_config(strat.config, device=device, seed=seed, progress=False)
    return strat.mask_objective(), options


class StepTimer:
    """Timestamps every optimizer step taken inside the ``with`` block (a global ``torch.optim`` step
    post-hook; on CUDA after a synchronize).  :meth:`step_seconds` gives steps 2..N as intervals."""

    def __init__(self, device: torch.device | str = "cpu", print_every: int = 0):
        self.device = torch.device(device)
        self.print_every = int(print_every)
        self.stamps: list[float] = []
        self._handle = None

    def _hook(self, optimizer, args, kwargs) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        n = len(self.stamps)
        if self.print_every and n > 1 and n % self.print_every == 0:
            print(f"  step {n}: {self.stamps[-1] - self.stamps[-2]:.4f} s", flush=True)

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


@dataclass
class Setup:
    """A base model, the content and style LoRAs, their reference images and prompts."""

    name: str
    base: BaseModel
    adapters: list[Any]
    content: torch.Tensor
    style: torch.Tensor
    content_prompt: str
    style_prompt: str
    cycle_prompt: str


def build_setup(config: str, device: str, dtype: torch.dtype, resolution: int | None = None,
                seed: int = 0) -> Setup:
    if config == "toyworld":
        import lora_merge as lm
        from lora_merge.model_mode.base_model import load_base_model
        from lora_merge.model_mode.tiny import random_lora
        from lora_merge.toyworld import (
            CONTENT_PROMPT,
            JOINT_PROMPT,
            STYLE_PROMPT,
            bundled_loras,
            reference_images,
        )

        base = load_base_model("toyworld", device=device, dtype=dtype)  # toyworld.model.load_base()
        files = bundled_loras()
        if all(Path(f).is_file() for f in files.values()):
            adapters, what = [lm.load(files["content"]), lm.load(files["style"])], "bundled LoRAs"
        else:  # the cost depends on the layers and ranks only: the bundled LoRAs' shape (rank 8, attention)
            adapters = [random_lora(base.unet, seed + 1, rank=8), random_lora(base.unet, seed + 2, rank=8)]
            what = "random rank-8 attention LoRAs (bundled LoRA files not found)"
        try:
            imgs = [reference_images(c, 16, seed) for c in ("content", "style")]
        except Exception:  # noqa: BLE001 - images only set the batch's values, not the cost
            g = torch.Generator().manual_seed(seed)
            imgs = [torch.rand(16, 3, base.image_size, base.image_size, generator=g) * 2 - 1 for _ in range(2)]
        return Setup(f"toyworld (bundled base UNet, {what})", base, adapters, *imgs,
                     CONTENT_PROMPT, STYLE_PROMPT, JOINT_PROMPT)  # fmt: skip
    if config == "tiny":
        from lora_merge.model_mode.tiny import random_lora, tiny_base_model

        base = tiny_base_model(seed, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        imgs = [torch.rand(8, 3, base.image_size, base.image_size, generator=g) * 2 - 1 for _ in range(2)]
        return Setup("tiny (lora_merge.model_mode.tiny, random)", base,
                     [random_lora(base.unet, seed + 1), random_lora(base.unet, seed + 2)], *imgs,
                     "a sks dog", "a cat in zkz style", "a sks dog in zkz style")  # fmt: skip
    if config in ("sdxl-tiny", "sdxl"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import sdxl_duolora_gpu as sx

        base = sx.sdxl_base_model("tiny" if config == "sdxl-tiny" else "sdxl", resolution, device, dtype, seed)
        rank = sx.CONFIGS["tiny" if config == "sdxl-tiny" else "sdxl"][4]
        res = base.image_size
        return Setup(f"{config} (benchmarks/sdxl_duolora_gpu.py, random weights, {res} px)", base,
                     [sx.random_lora(base.unet, rank, seed + 10), sx.random_lora(base.unet, rank, seed + 20)],
                     sx.reference_images(4, res, seed + 1), sx.reference_images(4, res, seed + 2),
                     sx.CONTENT_PROMPT, sx.STYLE_PROMPT, sx.CYCLE_PROMPT)  # fmt: skip
    raise SystemExit(f"unknown --config {config!r}; one of {', '.join(CONFIGS)}")


# ------------------------------------------------------------------------------------------ the two steps
def mask_steps(setup: Setup, case: str, steps: int, mixed_precision: str, batch_size: int,
               seed: int = 0) -> tuple[list[float], Any]:
    """Run ``train_masks`` for ``case`` for ``steps`` steps: the per-step seconds (steps 2..N) and the result."""
    strategy, overrides = CASES[case]
    objective, options = mask_config(strategy, overrides, steps=steps, mixed_precision=mixed_precision,
                                     batch_size=batch_size, seed=seed, device=setup.base.device)
    refs = References(Concept(setup.content, setup.content_prompt), Concept(setup.style, setup.style_prompt),
                      setup.cycle_prompt)
    with StepTimer(setup.base.device) as timer:
        result = train_masks(setup.base, setup.adapters, refs, objective, options)
    return timer.step_seconds(), result


class PlainLoraStep:
    """One ordinary LoRA training step on a copy of the same UNet: PEFT LoRA of ``rank`` on the attention
    projections, ε/v-prediction MSE on a content batch, backward, AdamW."""

    def __init__(self, setup: Setup, rank: int, mixed_precision: str, batch_size: int, lr: float = 1e-4,
                 seed: int = 0):
        from peft import LoraConfig, inject_adapter_in_model

        base = setup.base
        unet = copy.deepcopy(base.unet)
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(ATTENTION_TARGETS), init_lora_weights=True)
        unet = inject_adapter_in_model(cfg, unet)
        unet.requires_grad_(False)
        self.params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        unet.train()
        self.layers = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
        self.base = replace(base, unet=unet)
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.latents = base.encode_images(setup.content)
        self.cond = base.encode_prompt([setup.content_prompt])
        self.batch = batch_size
        self.gen = torch.Generator().manual_seed(seed + 4242)
        dev = base.device
        self.autocast = (torch.autocast(dev.type, dtype=DTYPES[mixed_precision]) if mixed_precision != "no"
                         else contextlib.nullcontext())  # fmt: skip

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def step(self) -> float:
        base, g, dev = self.base, self.gen, self.base.device
        t0 = time.perf_counter()
        idx = torch.randint(0, self.latents.shape[0], (self.batch,), generator=g)
        z = self.latents[idx.to(dev)]
        noise = torch.randn(z.shape, generator=g).to(dev, z.dtype)
        t = torch.randint(0, base.num_train_timesteps, (self.batch,), generator=g).to(dev)
        xt = base.add_noise(z, noise, t)
        if base.prediction_type == "v_prediction":
            ac = base.alphas_cumprod(t).to(z.dtype).view(-1, 1, 1, 1)
            target = ac.sqrt() * noise - (1 - ac).sqrt() * z
        elif base.prediction_type == "sample":
            target = z
        else:
            target = noise
        with self.autocast:
            pred = base.predict(xt, t, self.cond)
        loss = F.mse_loss(pred.float(), target.float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        float(loss.detach())  # the mask loop reads its loss terms too (and this synchronizes a GPU)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    def steps(self, n: int) -> list[float]:
        return [self.step() for _ in range(n)][2:]  # steps 1 and 2 are warm-up


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=CONFIGS, default="toyworld")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="UNet dtype; bf16/fp16 train under autocast like --mixed-precision")
    ap.add_argument("--steps", type=int, default=6, help="steps per case per round (the first two are warm-up)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1, help="images per step (model mode's --batch-size)")
    ap.add_argument("--resolution", type=int, default=None, help="px, for --config sdxl / sdxl-tiny")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps must be >= 3 (two warm-up steps, then at least one timed)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    mixed = "no" if dtype == torch.float32 else args.dtype

    setup = build_setup(args.config, args.device, dtype, args.resolution, args.seed)
    rank = max(m.rank for m in setup.adapters[0].modules.values())
    plain = PlainLoraStep(setup, rank, mixed, args.batch_size, seed=args.seed)
    lat = tuple(setup.base.encode_images(setup.content[:1]).shape[1:])
    print(f"{setup.name}: UNet {sum(p.numel() for p in setup.base.unet.parameters()):,} parameters, "
          f"latents {'×'.join(map(str, lat))}, batch {args.batch_size}, {args.dtype}, {setup.base.device}, "
          f"torch threads {torch.get_num_threads()}; LoRA rank {rank} on {len(setup.adapters[0].modules)} "
          f"layers (plain: PEFT on {plain.layers})", flush=True)

    labels = ["plain", *CASES]
    per_round: list[dict[str, float]] = []
    trainable: dict[str, int] = {"plain": plain.trainable}
    for r in range(args.rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        row: dict[str, float] = {}
        for label in order:
            if label == "plain":
                secs = plain.steps(args.steps)
            else:
                secs, result = mask_steps(setup, label, args.steps, mixed, args.batch_size, args.seed)
                secs = secs[1:]  # interval 1 is step 2; drop it too, so both sides time steps 3..N
                trainable[label] = result.num_trainable
            row[label] = statistics.median(secs)
            print(f"round {r + 1}/{args.rounds} {label:<17} {1e3 * row[label]:9.2f} ms/step "
                  f"(median of {len(secs)})", flush=True)
        per_round.append(row)

    table = []
    for label in labels:
        ms = statistics.median(x[label] for x in per_round) * 1e3
        ratio = statistics.median(x[label] / x["plain"] for x in per_round)
        lo, hi = (f(x[label] / x["plain"] for x in per_round) for f in (min, max))
        table.append({"case": label, "ms_per_step": ms, "ratio_vs_plain": ratio, "ratio_min": lo, "ratio_max": hi,
                      "unet_passes_no_grad": PASSES[label][0], "unet_passes_with_grad": PASSES[label][1],
                      "trainable_values": trainable.get(label)})  # fmt: skip
    print()
    print("| step | ms / step | × plain LoRA step (min–max over rounds) | UNet passes: no grad + with grad "
          "| trainable values |")
    print("|---|---:|---:|---:|---:|")
    for t in table:
        print(f"| {t['case']} | {t['ms_per_step']:.1f} | **{t['ratio_vs_plain']:.2f}×** "
              f"({t['ratio_min']:.2f}–{t['ratio_max']:.2f}) | {t['unet_passes_no_grad']} + "
              f"{t['unet_passes_with_grad']} | {t['trainable_values']:,} |")
    if args.json:
        out = {"command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python benchmarks/"
               "model_mode_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "setup": setup.name, "device": str(setup.base.device), "dtype": args.dtype,
               "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
               "torch_threads": torch.get_num_threads(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "table": table,
               "rounds_seconds": per_round}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
