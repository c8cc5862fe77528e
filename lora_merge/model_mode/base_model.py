"""The frozen base model that model mode runs LoRAs through.

:func:`load_base_model` loads a local diffusers pipeline folder (SD 1.x, SDXL; FLUX.1, SD3/3.5 and Z-Image through
:mod:`lora_merge.model_mode.dit_base`) or a registered named model
(the bundled toy world registers ``"toyworld"``) into a :class:`BaseModel`: UNet, a DDPM-type scheduler
(for adding noise), a prompt encoder that returns UNet keyword arguments, and an image encoder (VAE ×
scaling factor; identity for pixel-space models).  Nothing is ever downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import plugins
from ..errors import UsageError


@dataclass
class BaseModel:
    """A frozen text-to-image UNet with what it takes to make noisy latents and UNet conditioning."""

    unet: nn.Module  # the denoiser: a UNet (a DiT transformer in dit_base.FlowBaseModel)
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
    def lora_prefix(self) -> str:
        """The component prefix of the adapter module names that live in the denoiser."""
        return "unet."

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


#: named base models; a factory takes ``(device, dtype)``.  Plug-ins fill it (the toy world registers
#: ``"toyworld"``), see :mod:`lora_merge.plugins`.
_NAMED_MODELS: dict[str, Callable[[torch.device, torch.dtype], BaseModel]] = {}


def register_base_model(name: str, factory: Callable[[torch.device, torch.dtype], BaseModel]) -> None:
    """Make ``name`` usable wherever a base model is expected (``--base NAME``), e.g. a model built in
    Python.  A registered name takes precedence over a folder of the same name."""
    _NAMED_MODELS[name] = factory


def base_model_names() -> list[str]:
    """The registered base-model names (plug-ins loaded)."""
    plugins.load_all()
    return sorted(_NAMED_MODELS)


def load_base_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> BaseModel:
    """Load ``spec`` — a local diffusers pipeline folder (SD 1.x / SDXL UNets; FLUX.1, SD3/3.5, Z-Image
    transformers, :mod:`lora_merge.model_mode.dit_base`) or a name given to
    :func:`register_base_model` (the bundled toy world is ``"toyworld"``) — frozen, in eval mode.

    A folder's weights are read from ``.safetensors`` files only: a component with only pickle weights
    (``.bin``, ``.ckpt``, ``.pt``: pickle can run code) is refused unless ``allow_pickle``
    (``--allow-pickle``)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available")
    plugins.load_all()
    if spec in _NAMED_MODELS:
        model = _NAMED_MODELS[spec](device, dtype)
    else:
        path = Path(spec)
        if not path.is_dir():
            named = ", ".join(repr(n) for n in sorted(_NAMED_MODELS)) or "none registered"
            raise UsageError(
                "base model is not a local folder (nothing is downloaded); pass a diffusers pipeline "
                f"folder (SD 1.x, SDXL, FLUX.1, SD3/3.5) or a registered name ({named})",
                spec,
            )
        model = _load_pipeline_folder(path, device, dtype, allow_pickle)
    model.unet.requires_grad_(False)
    model.unet.eval()
    return model


#: pipeline class (``model_index.json`` ``_class_name``) → loader ``(path, index, device, dtype, allow_pickle)``
#: for pipelines that are not UNet pipelines; :mod:`lora_merge.model_mode.dit_base` registers FLUX.1, SD3, Z-Image
_PIPELINE_LOADERS: dict[str, Callable[..., BaseModel]] = {}


def register_pipeline_loader(class_name: str, loader: Callable[..., BaseModel]) -> None:
    """Load pipeline folders whose ``model_index.json`` names ``class_name`` with ``loader``."""
    _PIPELINE_LOADERS[class_name] = loader


#: the pipeline components whose weights are loaded
WEIGHT_FOLDERS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
PICKLE_WEIGHTS = (".bin", ".ckpt", ".pt", ".pth")


def check_safetensors_weights(path: Path, allow_pickle: bool) -> None:
    """Refuse a pipeline component that has pickle weights but no ``.safetensors`` ones (diffusers and
    transformers would fall back to unpickling them) unless ``allow_pickle``."""
    if allow_pickle:
        return
    for sub in WEIGHT_FOLDERS:
        folder = path / sub
        if not folder.is_dir():
            continue
        names = [p.name for p in folder.iterdir()]
        if any(n.endswith(".safetensors") for n in names):
            continue
        pickles = sorted(n for n in names if n.endswith(PICKLE_WEIGHTS))
        if pickles:
            raise UsageError(f"{sub}/ has only pickle weights ({pickles[0]}); refused (pickle can run code). "
                             "Convert them to safetensors, or pass --allow-pickle if you trust this folder", path)


def _load_pipeline_folder(path: Path, device: torch.device, dtype: torch.dtype,
                          allow_pickle: bool = False) -> BaseModel:
    index_file = path / "model_index.json"
    if not index_file.is_file() or not ((path / "unet").is_dir() or (path / "transformer").is_dir()):
        raise UsageError("not a diffusers pipeline folder (needs model_index.json and unet/ or transformer/)", path)
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read model_index.json: {exc}", path) from None
    check_safetensors_weights(path, allow_pickle)
    loader = _PIPELINE_LOADERS.get(str(index.get("_class_name")))
    if loader is not None:
        return loader(path, index, device, dtype, allow_pickle)
    if not (path / "unet").is_dir():
        raise UsageError(f"a {index.get('_class_name', 'pipeline')} folder without unet/: the supported "
                         f"transformer pipelines are {', '.join(sorted(_PIPELINE_LOADERS))}", path)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    # never unpickle without --allow-pickle: safetensors only (None: diffusers' default, safetensors first)
    kw = {"local_files_only": True, "use_safetensors": None if allow_pickle else True}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw).to(
            device
        )
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, **kw).to(device)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the pipeline: {exc}".splitlines()[0], path) from None
    vae.requires_grad_(False).eval()
    is_xl = "text_encoder_2" in index or getattr(unet.config, "addition_embed_type", None) == "text_time"
    arch = "sdxl" if is_xl else "sd1"
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    image_size = int(unet.config.sample_size) * vae_factor
    encode_prompt = _clip_prompt_encoder(path, index, device, image_size, is_xl, allow_pickle)

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


def _clip_prompt_encoder(path: Path, index: dict, device, image_size: int, is_xl: bool,
                         allow_pickle: bool = False) -> Callable:
    """SD 1.x: last hidden state of the CLIP text encoder.  SDXL: both encoders' penultimate hidden
    states concatenated, the second encoder's pooled projection and the size/crop time ids — as
    diffusers' ``StableDiffusionXLPipeline.encode_prompt`` builds them."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"local_files_only": True}
    wkw = {**kw, "use_safetensors": None if allow_pickle else True}  # weights: safetensors only by default
    try:
        tok1 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **wkw).to(device).eval()
        if is_xl:
            tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
            te2 = (
                CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **wkw)
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


