"""Flow-matching DiT pipelines (FLUX.1, SD3/3.5, Z-Image) as a :class:`~lora_merge.model_mode.base_model.BaseModel`,
for the noise measure of layer priors (``lora-merge priors measure --base FOLDER``, ``duolora --priors
measure``).

What it reproduces of diffusers' ``FluxPipeline`` / ``StableDiffusion3Pipeline`` / ``ZImagePipeline`` (no weights are
downloaded; a local pipeline folder, safetensors only unless ``--allow-pickle``):

* **noise**: rectified flow, ``x_t = (1 − σ)·x_0 + σ·ε`` with ``σ = t / 1000``; the transformer predicts the
  velocity ``ε − x_0``.  The measure compares predictions, so which target the model has does not matter.
* **latents**: ``(VAE mean − shift_factor) · scaling_factor``; Flux packs 2 × 2 latent patches into tokens
  and gets image position ids ``(0, row, col)``, as ``FluxPipeline._pack_latents`` /
  ``_prepare_latent_image_ids`` do; guidance-distilled Flux (``guidance_embeds``) gets guidance 3.5, the
  pipeline's default.
* **prompts**: Flux — CLIP's pooled output and T5's last hidden state (up to 512 tokens); SD3 — CLIP-L and
  CLIP-G penultimate hidden states side by side, zero-padded to T5's width and followed by T5's last hidden
  state (zeros when the folder has no ``text_encoder_3``), and the two CLIPs' pooled projections side by
  side, as ``StableDiffusion3Pipeline.encode_prompt`` builds them.

Only the noise measure runs on these models: model-mode mask training needs a DDPM-type UNet.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import families
from ..errors import UsageError
from .base_model import BaseModel, expand_cond, register_pipeline_loader

#: pipeline class (model_index.json ``_class_name``) → family: every family whose ``pipeline_loader`` is
#: :func:`load_flow_pipeline` (the families name their pipeline classes, lora_merge.families)
FLOW_LOADER = f"{__name__}:load_flow_pipeline"
FLOW_PIPELINES = {cls: fam.name for fam in families.all_families() if fam.pipeline_loader == FLOW_LOADER
                  for cls in fam.pipelines}
ZIMAGE_PROMPT_TOKENS = 512  # ZImagePipeline's max_sequence_length
FLUX_GUIDANCE = 3.5


@dataclass
class FlowBaseModel(BaseModel):
    """A flow-matching transformer (in the ``unet`` field: the denoiser) and its prompt/image encoders."""

    predict_fn: Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], torch.Tensor] | None = None

    @property
    def lora_prefix(self) -> str:
        return "transformer."

    @property
    def prediction_type(self) -> str:
        return "flow"

    def alphas_cumprod(self, timesteps: torch.Tensor) -> torch.Tensor:
        raise UsageError(f"{self.name or self.arch}: a flow-matching model has no DDPM noise schedule; only the "
                         "noise measure of priors runs on it (model-mode mask training needs a UNet)")

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = (timesteps.to(torch.float32) / self.num_train_timesteps).to(latents.dtype)
        sigma = sigma.view(-1, *([1] * (latents.dim() - 1)))
        return (1 - sigma) * latents + sigma * noise

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return self.predict_fn(noisy, timesteps, expand_cond(cond, noisy.shape[0]))


def load_flow_pipeline(path: Path, index: dict, device: torch.device, dtype: torch.dtype,
                       allow_pickle: bool = False) -> FlowBaseModel:
    """A FLUX.1, SD3/3.5 or Z-Image pipeline folder (``transformer/``, ``vae/``, text encoders, tokenizers);
    the family is the one whose ``pipelines`` name the folder's class, its transformer class the family's
    ``diffusers_class``, its prompt encoder and prediction :data:`FLOW_PARTS`'s."""
    import diffusers
    from diffusers import AutoencoderKL

    fam = families.by_pipeline(str(index["_class_name"]))
    if fam is None or fam.name not in FLOW_PARTS:
        raise UsageError(f"no flow-matching loader for pipeline class {index['_class_name']!r}", path)
    family = fam.name
    kw = {"local_files_only": True, "use_safetensors": None if allow_pickle else True}
    try:
        cls = getattr(diffusers, fam.diffusers_class)
        transformer = cls.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **kw).to(device)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, **kw).to(device)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler",
                                                                             local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the pipeline: {exc}".splitlines()[0], path) from None
    vae.requires_grad_(False).eval()
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if family == "sd3":
        image_size = int(transformer.config.sample_size) * vae_factor
    else:  # the Flux and Z-Image transformers have no sample size; the pipelines default to 1024 px (the VAE's)
        image_size = int(getattr(vae.config, "sample_size", 1024))
    if image_size % (2 * vae_factor):
        raise UsageError(f"image size {image_size} does not give an even latent size", path)

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        outs = []
        for chunk in images.split(4):
            lat = vae.encode(chunk.to(device, torch.float32)).latent_dist.mean
            outs.append((lat - shift) * scale)
        return torch.cat(outs)

    make_encoder, make_predict = FLOW_PARTS[family]
    encode_prompt, predict = make_encoder(path, device, transformer, allow_pickle), make_predict(transformer)
    return FlowBaseModel(unet=transformer, scheduler=scheduler, arch=family, image_size=image_size,
                         encode_prompt_fn=encode_prompt, encode_images_fn=encode_images, name=os.fspath(path),
                         device=device, dtype=dtype, predict_fn=predict)


# ---------------------------------------------------------------- FLUX.1
def _flux_predict(transformer):
    guided = bool(getattr(transformer.config, "guidance_embeds", False))

    def predict(x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        n, c, h, w = x.shape
        packed = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)
        ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
        text = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = torch.full((n,), FLUX_GUIDANCE, device=x.device, dtype=x.dtype) if guided else None
        return transformer(hidden_states=packed, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                           pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                           txt_ids=txt_ids, img_ids=ids.reshape(-1, 3), return_dict=False)[0]
    return predict


def _tokenize(tok, prompts, max_length: int, device):
    return tok(prompts, padding="max_length", max_length=max_length, truncation=True,
               return_tensors="pt").input_ids.to(device)


def _load_text(path: Path, sub: str, cls, allow_pickle: bool, device):
    from transformers import AutoTokenizer

    tok_sub = "tokenizer" + sub[len("text_encoder"):]
    try:
        tok = AutoTokenizer.from_pretrained(path, subfolder=tok_sub, local_files_only=True)
        model = cls.from_pretrained(path, subfolder=sub, local_files_only=True,
                                    use_safetensors=None if allow_pickle else True).to(device).eval()
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load {sub}/ or {tok_sub}/: {exc}".splitlines()[0], path) from None
    return tok, model


def _flux_prompt_encoder(path: Path, device, allow_pickle: bool) -> Callable:
    from transformers import CLIPTextModel, T5EncoderModel

    tok1, clip = _load_text(path, "text_encoder", CLIPTextModel, allow_pickle, device)
    tok2, t5 = _load_text(path, "text_encoder_2", T5EncoderModel, allow_pickle, device)
    t5_len = min(512, int(tok2.model_max_length))

    def encode(prompts: list[str]) -> dict:
        pooled = clip(_tokenize(tok1, prompts, tok1.model_max_length, device), output_hidden_states=False).pooler_output
        hidden = t5(_tokenize(tok2, prompts, t5_len, device), output_hidden_states=False)[0]
        return {"pooled_projections": pooled, "encoder_hidden_states": hidden}
    return encode


# ---------------------------------------------------------------- SD3 / 3.5
def _sd3_predict(transformer):
    def predict(x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return transformer(hidden_states=x, timestep=t.to(x.dtype), encoder_hidden_states=cond["encoder_hidden_states"],
                           pooled_projections=cond["pooled_projections"], return_dict=False)[0]
    return predict


def _sd3_prompt_encoder(path: Path, device, transformer, allow_pickle: bool) -> Callable:
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    tok1, clip_l = _load_text(path, "text_encoder", CLIPTextModelWithProjection, allow_pickle, device)
    tok2, clip_g = _load_text(path, "text_encoder_2", CLIPTextModelWithProjection, allow_pickle, device)
    t5 = None
    if (path / "text_encoder_3").is_dir():
        tok3, t5 = _load_text(path, "text_encoder_3", T5EncoderModel, allow_pickle, device)
    joint = int(transformer.config.joint_attention_dim)
    t5_len = 256  # StableDiffusion3Pipeline's max_sequence_length

    def clip(tok, model, prompts):
        out = model(_tokenize(tok, prompts, tok.model_max_length, device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def encode(prompts: list[str]) -> dict:
        hl, pl = clip(tok1, clip_l, prompts)
        hg, pg = clip(tok2, clip_g, prompts)
        clip_embeds = torch.cat([hl, hg], dim=-1)
        if clip_embeds.shape[-1] > joint:
            raise UsageError(f"the CLIP encoders' widths add up to {clip_embeds.shape[-1]}, more than the "
                             f"transformer's joint_attention_dim {joint}", path)
        clip_embeds = F.pad(clip_embeds, (0, joint - clip_embeds.shape[-1]))
        if t5 is not None:
            t5_embeds = t5(_tokenize(tok3, prompts, min(t5_len, int(tok3.model_max_length)), device))[0]
        else:
            t5_embeds = torch.zeros(len(prompts), t5_len, joint, device=device, dtype=clip_embeds.dtype)
        return {"encoder_hidden_states": torch.cat([clip_embeds, t5_embeds], dim=-2),
                "pooled_projections": torch.cat([pl, pg], dim=-1)}
    return encode


# ---------------------------------------------------------------- Z-Image
def _zimage_predict(transformer):
    """Z-Image takes lists (one latent of one frame and one caption of its own length per sample), the
    time as ``1 − σ``, and predicts the negative velocity (``ZImagePipeline`` negates it)."""
    def predict(x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        caps, lens = cond["cap_feats"], cond["cap_lens"]
        out = transformer(list(x.unsqueeze(2).unbind(0)), (1000 - t.to(x.dtype)) / 1000,
                          [caps[i, :int(lens[i])] for i in range(x.shape[0])], return_dict=False)[0]
        return -torch.stack(list(out)).squeeze(2)
    return predict


def _zimage_prompt_encoder(path: Path, device, allow_pickle: bool) -> Callable:
    """The prompt in the tokenizer's chat template (``enable_thinking``), the text encoder's penultimate
    hidden states of the real tokens, as ``ZImagePipeline._encode_prompt``; kept left-aligned and padded
    with their lengths, so a batch can be sliced."""
    from transformers import AutoModel

    tok, te = _load_text(path, "text_encoder", AutoModel, allow_pickle, device)

    def encode(prompts: list[str]) -> dict:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=True) for p in prompts]
        inp = tok(texts, padding="max_length", max_length=ZIMAGE_PROMPT_TOKENS, truncation=True, return_tensors="pt")
        ids, mask = inp.input_ids.to(device), inp.attention_mask.to(device).bool()
        hidden = te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        lens = mask.sum(dim=1)
        caps = torch.zeros_like(hidden)
        for i in range(len(prompts)):
            caps[i, :int(lens[i])] = hidden[i][mask[i]]
        return {"cap_feats": caps, "cap_lens": lens}
    return encode


#: family → (prompt encoder ``(path, device, transformer, allow_pickle)``, prediction ``(transformer)``)
FLOW_PARTS: dict[str, tuple[Callable, Callable]] = {
    "flux": (lambda path, device, transformer, allow_pickle: _flux_prompt_encoder(path, device, allow_pickle),
             _flux_predict),
    "sd3": (_sd3_prompt_encoder, _sd3_predict),
    "z-image": (lambda path, device, transformer, allow_pickle: _zimage_prompt_encoder(path, device, allow_pickle),
                _zimage_predict),
}


def _family_loader(ref: str) -> Callable[..., BaseModel]:
    def load(*args, **kwargs) -> BaseModel:
        return families.resolve(ref)(*args, **kwargs)
    return load


# the families' pipeline classes load with the loader each family names (resolved at load time)
for _fam in families.all_families():
    if _fam.pipeline_loader is not None:
        for _class_name in _fam.pipelines:
            register_pipeline_loader(_class_name, load_flow_pipeline if _fam.pipeline_loader == FLOW_LOADER
                                     else _family_loader(_fam.pipeline_loader))
