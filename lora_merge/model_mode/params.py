"""The strategy parameters model mode adds to ``ziplora`` and ``duolora`` (declared once, shared).

``--mode model`` trains the masks through the diffusion model (the papers' algorithm); ``--mode weights``
(the default) solves them from the two files alone.  The shared parameters (``steps``, ``lr``, the λ's,
``axis``, ``priors``) are the strategies' own; model mode reads them too.
"""

from __future__ import annotations

from ..strategies.base import Param

MODES = ("weights", "model")

MODE_PARAM = Param(
    "mode", str, "weights",
    "weights: solve the masks from the two files alone; model: train them through the diffusion model on "
    "reference images (needs --base, --content-images/--content-prompt, --style-images/--style-prompt)",
    choices=MODES,
)  # fmt: skip

MODEL_MODE_PARAMS: tuple[Param, ...] = (
    MODE_PARAM,
    Param(
        "base",
        str,
        None,
        "model mode: base model, a local diffusers pipeline folder (SD 1.x, SDXL) or 'toyworld'",
    ),
    Param(
        "content_images",
        str,
        None,
        "model mode: folder of content reference images (toyworld:content: the toy world's)",
    ),
    Param("content_prompt", str, None, "model mode: prompt of the content images"),
    Param(
        "style_images",
        str,
        None,
        "model mode: folder of style reference images (toyworld:style: the toy world's)",
    ),
    Param("style_prompt", str, None, "model mode: prompt of the style images"),
    Param(
        "cycle_prompt",
        str,
        None,
        "model mode: prompt of content in style for the Constyle cycles, e.g. 'a sks dog in zkz style' "
        "(default: the content and style prompts joined)",
    ),
    Param(
        "lambda_rev",
        float,
        None,
        "model mode: weight of the reverse Constyle cycle (style → add content → remove content); "
        "default: --lambda-cycle",
        range=(0.0, None),
    ),
    Param(
        "mixed_precision", str, "no", "model mode: accelerate mixed precision", choices=("no", "fp16", "bf16")
    ),
    Param("batch_size", int, 1, "model mode: content and style images per step", range=(1, None)),
)

#: parameters that must be set in model mode
REQUIRED_IN_MODEL_MODE = ("base", "content_images", "content_prompt", "style_images", "style_prompt")

#: what each strategy adds: ZipLoRA has no Constyle cycles, so no cycle prompt or reverse-cycle weight
DUOLORA_MODEL_PARAMS: tuple[Param, ...] = MODEL_MODE_PARAMS
ZIPLORA_MODEL_PARAMS: tuple[Param, ...] = tuple(
    p for p in MODEL_MODE_PARAMS if p.name not in ("cycle_prompt", "lambda_rev")
)
