"""Model mode: train ZipLoRA/DuoLoRA masks through a diffusers UNet, and record activation statistics.

``runtime`` (base model loading, LoRA wrapping), ``train`` (the mask training loop), ``calibrate``
(per-layer input second moments), ``params`` (the strategy parameters model mode adds).
"""
