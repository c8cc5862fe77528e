"""Model mode: train ZipLoRA/DuoLoRA masks through a diffusers UNet, and record activation statistics.

``base_model`` (loading a frozen base model; named models are registered), ``dit_base`` (FLUX.1, SD3 and Z-Image
pipeline folders, registered with ``base_model``), ``images`` (reference images:
folders and registered sources), ``lora_layers`` (LoRA wrapping with trainable masks), ``mask_training``
(the mask training loop), ``calibrate`` (per-layer input second moments), ``measure_priors`` (the noise
measurement behind measured DuoLoRA priors).
"""

from . import dit_base  # noqa: F401  (registers the FLUX.1 / SD3 pipeline loaders)
