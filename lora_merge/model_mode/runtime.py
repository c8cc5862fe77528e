"""Run LoRAs through a real diffusers UNet: load a base model, wrap its LoRA'd layers with masks.

This is the shared runtime of model mode (``ziplora``/``duolora --mode model``), ``lora-merge
calibrate`` and measured priors.  Two pieces:

* :func:`load_base_model` loads a local diffusers pipeline folder (SD 1.x, SDXL) or the bundled toy
  world into a :class:`BaseModel`: UNet, a DDPM-type scheduler (for adding noise), a prompt encoder
  that returns UNet keyword arguments, and an image encoder (VAE × scaling factor; identity in the
  pixel-space toy world).  Nothing is ever downloaded (``local_files_only=True``).
* :func:`attach_loras` replaces every LoRA'd ``nn.Linear``/``nn.Conv2d`` of the UNet, in place, with a
  :class:`MaskedLoraLayer` computing ``W0 x + Σ_i strength_i · scale_i · g_i(x)`` where ``g_i`` is input
  ``i``'s LoRA with an optional trainable mask (``rank``: ``B diag(m) A``; ``out``: ``diag(m) B A``;
  ``in``: ``B A diag(m)``, algorithms.md §2).  Per-input strengths, a switch for the masks and per-group
  scales make one wrapped UNet act as content-only, style-only or merged without copying it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MergeError, UsageError

MaskKind = Literal["rank", "out", "in"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
UNET_PREFIX = "unet."


# --------------------------------------------------------------------------------------------------
# base model
# --------------------------------------------------------------------------------------------------
@dataclass
class BaseModel:
    """A frozen text-to-image UNet with what it takes to make noisy latents and UNet conditioning."""

    unet: nn.Module
    scheduler: Any  # DDPM-type: alphas_cumprod, add_noise, config.num_train_timesteps/prediction_type
    arch: str | None
    image_size: int
    encode_prompt_fn: Callable[[list[str]], Any]
    encode_images_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    def encode_prompt(self, prompts: Sequence[str]) -> dict[str, Any]:
        """UNet keyword arguments for ``prompts``: ``encoder_hidden_states`` (and ``added_cond_kwargs``)."""
        with torch.no_grad():
            out = self.encode_prompt_fn(list(prompts))
        if isinstance(out, torch.Tensor):
            out = {"encoder_hidden_states": out}
        return _to(out, self.device, self.dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images in ``[-1, 1]`` (``N × 3 × H × W``); identity for pixel-space models."""
        if self.encode_images_fn is None:
            return images.to(self.device, self.dtype)
        with torch.no_grad():
            return self.encode_images_fn(images).to(self.device, self.dtype)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return str(getattr(self.scheduler.config, "prediction_type", "epsilon"))

    def alphas_cumprod(self, timesteps: torch.Tensor) -> torch.Tensor:
        ac = self.scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
        return ac[timesteps.long()]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        ac = self.alphas_cumprod(timesteps).to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
        return ac.sqrt() * latents + (1 - ac).sqrt() * noise

    def predict_x0(
        self, noisy: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Recover ``x̂0`` from a model prediction (epsilon, v or sample parameterization), clipped like the
        scheduler's own step when its config has ``clip_sample`` (pixel-space models such as the toy world)."""
        ac = self.alphas_cumprod(timesteps).to(noisy.dtype).view(-1, *([1] * (noisy.dim() - 1)))
        if self.prediction_type == "epsilon":
            x0 = (noisy - (1 - ac).sqrt() * model_output) / ac.sqrt()
        elif self.prediction_type == "v_prediction":
            x0 = ac.sqrt() * noisy - (1 - ac).sqrt() * model_output
        elif self.prediction_type == "sample":
            x0 = model_output
        else:
            raise UsageError(f"unsupported scheduler prediction_type {self.prediction_type!r}")
        cfg = self.scheduler.config
        if getattr(cfg, "clip_sample", False):
            r = float(getattr(cfg, "clip_sample_range", 1.0))
            x0 = x0.clamp(-r, r)
        return x0

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """UNet output for a batch (``cond`` from :meth:`encode_prompt`, batch 1 or the batch size)."""
        cond = expand_cond(cond, noisy.shape[0])
        out = self.unet(noisy, timesteps, **cond)
        return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)


def _to(obj: Any, device, dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def expand_cond(cond: dict[str, Any], n: int) -> dict[str, Any]:
    """Repeat batch-1 conditioning tensors to batch ``n`` (nested dicts included)."""

    def rep(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1 and n != 1:
            return v.expand(n, *v.shape[1:])
        if isinstance(v, dict):
            return {k: rep(x) for k, x in v.items()}
        return v

    return {k: rep(v) for k, v in cond.items()}


#: named base models (``"toyworld"`` built in); a factory takes ``(device, dtype)``
_NAMED_MODELS: dict[str, Callable[[torch.device, torch.dtype], BaseModel]] = {}


def register_base_model(name: str, factory: Callable[[torch.device, torch.dtype], BaseModel]) -> None:
    """Make ``name`` usable wherever a base model is expected (``--base NAME``), e.g. a model built in
    Python.  A registered name takes precedence over a folder of the same name."""
    _NAMED_MODELS[name] = factory


def load_base_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BaseModel:
    """Load ``spec`` — a local diffusers pipeline folder (SD 1.x / SDXL), ``"toyworld"`` or a name given to
    :func:`register_base_model` — frozen, in eval mode."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available")
    if spec in _NAMED_MODELS:
        model = _NAMED_MODELS[spec](device, dtype)
    elif spec == "toyworld":
        model = _load_toyworld(device, dtype)
    else:
        path = Path(spec)
        if not path.is_dir():
            raise UsageError(
                "base model is not a local folder (nothing is downloaded); pass a diffusers pipeline "
                "folder (SD 1.x or SDXL) or 'toyworld'",
                spec,
            )
        model = _load_pipeline_folder(path, device, dtype)
    model.unet.requires_grad_(False)
    model.unet.eval()
    return model


def _load_toyworld(device: torch.device, dtype: torch.dtype) -> BaseModel:
    try:
        from ..toyworld.model import load_base
    except ImportError as exc:  # pragma: no cover - the package ships it
        raise UsageError(f"the bundled toy world is not available: {exc}") from None
    base = load_base(device=device)
    unet = base.unet if dtype == torch.float32 else base.unet.to(dtype)
    size = int(base.image_size)

    def encode_prompt(prompts: list[str]) -> Any:
        return base.encode_prompt(prompts)

    return BaseModel(
        unet=unet,
        scheduler=base.scheduler,
        arch="toyworld",
        image_size=size,
        encode_prompt_fn=encode_prompt,
        encode_images_fn=None,
        name="toyworld",
        device=device,
        dtype=dtype,
    )


def _load_pipeline_folder(path: Path, device: torch.device, dtype: torch.dtype) -> BaseModel:
    index_file = path / "model_index.json"
    if not index_file.is_file() or not (path / "unet").is_dir():
        raise UsageError("not a diffusers pipeline folder (needs model_index.json and unet/)", path)
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read model_index.json: {exc}", path) from None
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    kw = {"local_files_only": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw).to(
            device
        )
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, **kw).to(device)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the pipeline: {exc}".splitlines()[0], path) from None
    vae.requires_grad_(False).eval()
    is_xl = "text_encoder_2" in index or getattr(unet.config, "addition_embed_type", None) == "text_time"
    arch = "sdxl" if is_xl else "sd1"
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    image_size = int(unet.config.sample_size) * vae_factor
    encode_prompt = _clip_prompt_encoder(path, index, device, image_size, is_xl)

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        outs = []
        for chunk in images.split(4):
            lat = vae.encode(chunk.to(device, torch.float32)).latent_dist.mean
            outs.append(lat * scale)
        return torch.cat(outs)

    return BaseModel(
        unet=unet,
        scheduler=scheduler,
        arch=arch,
        image_size=image_size,
        encode_prompt_fn=encode_prompt,
        encode_images_fn=encode_images,
        name=os.fspath(path),
        device=device,
        dtype=dtype,
    )


def _clip_prompt_encoder(path: Path, index: dict, device, image_size: int, is_xl: bool) -> Callable:
    """SD 1.x: last hidden state of the CLIP text encoder.  SDXL: both encoders' penultimate hidden
    states concatenated, the second encoder's pooled projection and the size/crop time ids — as
    diffusers' ``StableDiffusionXLPipeline.encode_prompt`` builds them."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"local_files_only": True}
    try:
        tok1 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw).to(device).eval()
        if is_xl:
            tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
            te2 = (
                CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
                .to(device)
                .eval()
            )
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the text encoder: {exc}".splitlines()[0], path) from None

    def ids(tok, prompts):
        return tok(
            prompts,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)

    def encode(prompts: list[str]) -> dict:
        if not is_xl:
            return {"encoder_hidden_states": te1(ids(tok1, prompts))[0]}
        o1 = te1(ids(tok1, prompts), output_hidden_states=True)
        o2 = te2(ids(tok2, prompts), output_hidden_states=True)
        hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        pooled = o2.text_embeds if hasattr(o2, "text_embeds") else o2[0]
        time_ids = torch.tensor(
            [[image_size, image_size, 0, 0, image_size, image_size]], dtype=hidden.dtype, device=hidden.device
        ).expand(len(prompts), 6)
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }

    return encode


def resolve_images(spec: torch.Tensor | str | os.PathLike, size: int) -> torch.Tensor:
    """Reference images from a tensor, a folder, or ``toyworld:content`` / ``toyworld:style`` (the images the
    bundled toy-world LoRAs were trained on, 64 each)."""
    if isinstance(spec, torch.Tensor):
        return spec
    text = os.fspath(spec)
    if text.startswith("toyworld:"):
        from ..toyworld import reference_images

        concept = text.split(":", 1)[1]
        if concept not in ("content", "style"):
            raise UsageError(f"{text!r}: use toyworld:content or toyworld:style")
        imgs = reference_images(concept)
        if imgs.shape[-1] != size:
            imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
        return imgs
    return load_image_folder(text, size)


def load_image_folder(directory: str | os.PathLike, size: int) -> torch.Tensor:
    """All images in ``directory`` (sorted by name), RGB, shorter side resized to ``size`` and centre
    cropped, as ``N × 3 × size × size`` in ``[-1, 1]``."""
    from PIL import Image

    d = Path(directory)
    if not d.is_dir():
        raise UsageError("image folder does not exist", d)
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder", d)
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                k = size / min(w, h)
                im = im.resize((max(size, round(w * k)), max(size, round(h * k))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
                t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
        except OSError as exc:
            raise UsageError(f"cannot read image: {exc}", f) from None
        out.append(t.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# wrapped LoRA layers
# --------------------------------------------------------------------------------------------------
class LoraSlot(nn.Module):
    """One input's LoRA on one layer: fp32 factors (buffers), its scale, an optional trainable mask."""

    def __init__(
        self,
        up: torch.Tensor,
        down: torch.Tensor,
        scale: float,
        mask_kind: MaskKind | None,
        mask_init: torch.Tensor | None,
    ):
        super().__init__()
        self.register_buffer("up", up.float(), persistent=False)  # d_out × r (flattened)
        self.register_buffer("down", down.float(), persistent=False)  # r × d_in (flattened)
        self.scale = float(scale)
        self.strength = 1.0
        self.group_scale = 1.0
        self.mask_kind = mask_kind
        if mask_kind is None:
            self.mask = None
        else:
            size = {"rank": down.shape[0], "out": up.shape[0], "in": down.shape[1]}[mask_kind]
            init = torch.ones(size) if mask_init is None else mask_init.detach().float().reshape(-1)
            if init.numel() != size:
                raise ValueError(f"mask init has {init.numel()} values, the {mask_kind} mask needs {size}")
            self.mask = nn.Parameter(init.clone().to(self.up.device))

    def factors(self, use_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B', A')`` with the mask folded in (algorithms.md §2), unscaled."""
        b, a = self.up, self.down
        m = self.mask if use_mask else None
        if m is None:
            return b, a
        if self.mask_kind == "rank":
            return b, m[:, None] * a
        if self.mask_kind == "out":
            return m[:, None] * b, a
        return b, a * m[None, :]


class MaskedLoraLayer(nn.Module):
    """``W0 x + Σ_i strength_i · group_scale_i · scale_i · B'_i A'_i x`` around a frozen Linear/Conv2d."""

    def __init__(self, base: nn.Module, name: str):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise MergeError(
                f"layer {name} is a {type(base).__name__}; only Linear and Conv2d can be wrapped"
            )
        self.base = base
        self.name = name
        self.slots = nn.ModuleList()
        self.use_masks = True

    def add_slot(self, slot: LoraSlot) -> None:
        self.slots.append(slot)

    def lora_output(self, x: torch.Tensor, index: int, use_mask: bool | None = None) -> torch.Tensor:
        """``scale_i · B'_i A'_i x`` for input ``index`` (no strength applied)."""
        slot = self.slots[index]
        b, a = slot.factors(self.use_masks if use_mask is None else use_mask)
        b, a = b.to(x.dtype), a.to(x.dtype)
        if isinstance(self.base, nn.Linear):
            return F.linear(F.linear(x, a), b) * slot.scale
        w = self.base.weight
        a4 = a.reshape(a.shape[0], *w.shape[1:])
        h = F.conv2d(
            x,
            a4,
            stride=self.base.stride,
            padding=self.base.padding,
            dilation=self.base.dilation,
            groups=self.base.groups,
        )
        return F.conv2d(h, b.reshape(b.shape[0], b.shape[1], 1, 1)) * slot.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for i, slot in enumerate(self.slots):
            s = slot.strength * slot.group_scale
            if s != 0:
                y = y + s * self.lora_output(x, i)
        return y

    def merged_delta(self) -> torch.Tensor:
        """Dense fp32 ``Σ_i strength_i · scale_i · B'_i A'_i`` (flattened), for tests and reports."""
        out = None
        for slot in self.slots:
            b, a = slot.factors(self.use_masks)
            d = (b * (slot.scale * slot.strength * slot.group_scale)) @ a
            out = d if out is None else out + d
        return out


@dataclass
class LoraSet:
    """The wrapped layers of one UNet (canonical module name → layer) and switches over them."""

    unet: nn.Module
    layers: dict[str, MaskedLoraLayer]
    num_inputs: int
    skipped: list[str] = field(default_factory=list)  # adapter modules outside the UNet (text encoders)
    _originals: dict[str, nn.Module] = field(default_factory=dict)

    # ---- masks ----
    def mask_parameters(self) -> list[nn.Parameter]:
        return [s.mask for layer in self.layers.values() for s in layer.slots if s.mask is not None]

    def named_masks(self) -> Iterator[tuple[str, int, nn.Parameter]]:
        for name, layer in self.layers.items():
            for i, s in enumerate(layer.slots):
                if s.mask is not None:
                    yield name, i, s.mask

    def masks(self) -> dict[str, list[torch.Tensor | None]]:
        """Detached fp32 CPU copies: layer name → one mask (or None) per input."""
        return {
            name: [None if s.mask is None else s.mask.detach().float().cpu().clone() for s in layer.slots]
            for name, layer in self.layers.items()
        }

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.mask_parameters())

    # ---- switches ----
    def set_strengths(self, strengths: Sequence[float]) -> None:
        if len(strengths) != self.num_inputs:
            raise ValueError(f"expected {self.num_inputs} strengths, got {len(strengths)}")
        for layer in self.layers.values():
            for s, v in zip(layer.slots, strengths):
                s.strength = float(v)

    def set_use_masks(self, flag: bool) -> None:
        for layer in self.layers.values():
            layer.use_masks = bool(flag)

    @contextlib.contextmanager
    def configured(self, strengths: Sequence[float] | None = None, use_masks: bool | None = None):
        """Temporarily set strengths and/or the mask switch, e.g. ``configured((1, 0), use_masks=False)``
        is the content LoRA alone, unmasked."""
        old_s = [s.strength for s in next(iter(self.layers.values())).slots] if self.layers else []
        old_m = next(iter(self.layers.values())).use_masks if self.layers else True
        try:
            if strengths is not None:
                self.set_strengths(strengths)
            if use_masks is not None:
                self.set_use_masks(use_masks)
            yield self
        finally:
            if self.layers:
                self.set_strengths(old_s)
                self.set_use_masks(old_m)

    def only(self, index: int, use_masks: bool = False):
        """Context: input ``index`` alone at strength 1 (unmasked by default)."""
        return self.configured([1.0 if i == index else 0.0 for i in range(self.num_inputs)], use_masks)

    def select(self, pattern: str | Callable[[str], bool] | Iterable[str]) -> list[str]:
        """Names of wrapped layers matched by a pattern (see :mod:`lora_merge.patterns`), a predicate or
        an explicit collection of names."""
        if callable(pattern):
            return [n for n in self.layers if pattern(n)]
        if isinstance(pattern, str):
            from ..patterns import matches

            return [n for n in self.layers if matches(pattern, n)]
        wanted = set(pattern)
        return [n for n in self.layers if n in wanted]

    def set_group_scale(self, pattern, factor: float, inputs: Sequence[int] | None = None) -> list[str]:
        """Multiply the matched layers' LoRA contribution (for ``inputs``, default all) by ``factor``."""
        names = self.select(pattern)
        idx = range(self.num_inputs) if inputs is None else inputs
        for n in names:
            for i in idx:
                self.layers[n].slots[i].group_scale = float(factor)
        return names

    def reset_group_scales(self) -> None:
        for layer in self.layers.values():
            for s in layer.slots:
                s.group_scale = 1.0

    @contextlib.contextmanager
    def scaled(self, pattern, factor: float, inputs: Sequence[int] | None = None):
        """Context: the matched layers' LoRA contribution scaled by ``factor`` (ablations, priors)."""
        names = self.select(pattern)
        idx = list(range(self.num_inputs) if inputs is None else inputs)
        saved = {(n, i): self.layers[n].slots[i].group_scale for n in names for i in idx}
        try:
            self.set_group_scale(names, factor, idx)
            yield names
        finally:
            for (n, i), v in saved.items():
                self.layers[n].slots[i].group_scale = v

    def detach(self) -> None:
        """Put the original layers back into the UNet."""
        for name, orig in self._originals.items():
            _set_submodule(self.unet, name, orig)
        self._originals.clear()
        self.layers.clear()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def unet_module_name(canonical: str, prefix: str = UNET_PREFIX) -> str | None:
    """The UNet submodule path of a canonical adapter module name, or None when it is not a UNet module."""
    if prefix and canonical.startswith(prefix):
        return canonical[len(prefix) :]
    return None


def attach_loras(
    unet: nn.Module,
    adapters: Sequence[Any],
    *,
    weights: Sequence[float] | Callable[[str], Sequence[float]] | None = None,
    mask_kinds: Sequence[MaskKind | None] | MaskKind | None = None,
    mask_init: Callable[[str, int, int, tuple[int, ...]], torch.Tensor | None] | None = None,
    prefix: str = UNET_PREFIX,
    layer_filter: Callable[[str], bool] | None = None,
) -> LoraSet:
    """Wrap every UNet layer that any adapter touches.

    ``adapters`` are :class:`~lora_merge.adapter.Adapter` objects; ``weights`` multiply each LoRA's own
    ``alpha/r`` (default 1; a callable gives per-layer weights from the canonical name); ``mask_kinds``
    is one kind per input (or one for all; None = no mask);
    ``mask_init(name, input_index, size, ranks)`` may return the initial mask (default ones; ``ranks``
    are all inputs' ranks at that layer).  Modules outside
    the UNet (text encoders) are listed in ``LoraSet.skipped``; a UNet module the base model lacks, or
    whose shape differs, is a :class:`~lora_merge.errors.MergeError` (wrong base model).
    """
    n = len(adapters)
    if weights is None:
        weights = [1.0] * n
    weight_of = weights if callable(weights) else (lambda _name, _w=[float(w) for w in weights]: _w)
    if not callable(weights) and len(weights) != n:
        raise UsageError(f"{len(weights)} weights for {n} adapters")
    kinds = list(mask_kinds) if isinstance(mask_kinds, (list, tuple)) else [mask_kinds] * n
    names: list[str] = []
    skipped: list[str] = []
    for ad in adapters:
        for cname in ad.modules:
            if cname in names or cname in skipped:
                continue
            if unet_module_name(cname, prefix) is None:
                skipped.append(cname)
            elif layer_filter is None or layer_filter(cname):
                names.append(cname)
    device = next(unet.parameters()).device
    layers: dict[str, MaskedLoraLayer] = {}
    originals: dict[str, nn.Module] = {}
    lora_set = LoraSet(unet, layers, n, skipped, originals)
    try:
        for cname in names:
            sub = unet_module_name(cname, prefix)
            try:
                base = unet.get_submodule(sub)
            except AttributeError:
                raise MergeError(
                    f"the base model has no layer {sub!r} (adapter module {cname}); wrong base model?"
                )
            if isinstance(base, MaskedLoraLayer):
                raise MergeError(f"layer {sub!r} is already wrapped; detach the previous LoraSet first")
            layer = MaskedLoraLayer(base, cname)
            w_shape = tuple(base.weight.shape)
            layer_w = [float(x) for x in weight_of(cname)]
            d_out, d_in = w_shape[0], int(torch.tensor(w_shape[1:]).prod())
            factors = []
            for i, ad in enumerate(adapters):
                mod = ad.modules.get(cname)
                if mod is None:  # absent from this input: a zero update with a zero-size rank
                    up, down, scale = torch.zeros(d_out, 0), torch.zeros(0, d_in), 0.0
                else:
                    up, down = mod.factors(torch.float32, device)
                    scale = mod.scale * layer_w[i]
                if up.shape[0] != d_out or down.shape[1] != d_in:
                    raise MergeError(
                        f"adapter module {cname} has shape {tuple(up.shape[:1]) + tuple(down.shape[1:])}, "
                        f"the base layer {tuple(w_shape)}; wrong base model?",
                        getattr(ad, "source", None),
                    )
                factors.append((up, down, scale))
            ranks = tuple(int(f[1].shape[0]) for f in factors)
            for i, (up, down, scale) in enumerate(factors):
                kind = kinds[i]
                init = None
                if kind is not None and mask_init is not None:
                    size = {"rank": down.shape[0], "out": d_out, "in": d_in}[kind]
                    init = mask_init(cname, i, size, ranks)
                layer.add_slot(LoraSlot(up.to(device), down.to(device), scale, kind, init))
            layer.to(device)
            originals[sub] = base
            _set_submodule(unet, sub, layer)
            layers[cname] = layer
    except Exception:
        lora_set.detach()
        raise
    return lora_set
