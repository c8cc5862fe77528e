"""In-memory model of one LoRA adapter file.

An :class:`Adapter` maps canonical module paths (diffusers/PEFT naming, e.g.
``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``; for PEFT adapters of other models the
path after ``base_model.model.``) to :class:`LoraModule` objects.  Tensors are referenced lazily
(:class:`TensorRef`), so reading the header of a large file costs nothing.

Strength convention (see docs/formats.md): ``ΔW = scale · B · A`` with ``scale = alpha / r``
(``alpha / sqrt(r)`` for rsLoRA).  A module without a stored alpha has ``alpha = r``.
"""
from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .errors import FormatError
from .linalg import all_finite

ModuleKind = Literal["linear", "conv", "conv1x1"]
ScaleRule = Literal["standard", "rslora"]


class _SafetensorsHandle:
    """One shared, lazily opened handle per file.

    Without ``layout`` every read goes through ``safe_open(...).get_tensor``.  With ``layout`` (key →
    ``(dtype, shape, first byte, end byte)`` in the file, from a validated header) the file is mapped
    once, privately (copy-on-write, like ``safe_open``), and each tensor is a zero-copy view with its own
    storage: ~6 µs per tensor instead of ~25 µs, and no lock after the first read.
    """

    def __init__(self, path: str | os.PathLike, layout: dict | None = None):
        self.path = os.fspath(path)
        self._handle = None
        self._lock = threading.Lock()
        self._layout = layout
        self._storage: torch.UntypedStorage | None = None

    def get(self, key: str) -> torch.Tensor:
        spec = self._layout.get(key) if self._layout else None
        if spec is not None and spec[2] % spec[0].itemsize == 0:
            return self._mapped(key, *spec)
        from safetensors import safe_open

        with self._lock:
            if self._handle is None:
                self._handle = safe_open(self.path, framework="pt", device="cpu")
            return self._handle.get_tensor(key)

    def _mapped(self, key: str, dtype: torch.dtype, shape, begin: int, end: int) -> torch.Tensor:
        st = self._storage
        if st is None:
            with self._lock:
                if self._storage is None:
                    size = os.path.getsize(self.path)
                    self._storage = torch.UntypedStorage.from_file(self.path, shared=False, nbytes=size)
                st = self._storage
        if end > st.nbytes():
            raise OSError(f"file is shorter than its header says ({st.nbytes()} bytes; changed since read?)")
        t = torch.empty(0, dtype=dtype)
        t.set_(st[begin:end])
        return t.view(shape)

    def close(self) -> None:
        with self._lock:
            self._handle = None
            self._storage = None


def _short(key: str | None, limit: int = 120) -> str:
    """A tensor key for a message: quoted, and cut to ``limit`` characters (a header may hold huge names)."""
    if key is None:
        return "(in memory)"
    return repr(key) if len(key) <= limit else repr(key[:limit]) + f"… ({len(key):,} characters)"


@dataclass
class TensorRef:
    """A tensor that is either in memory or stored under ``key`` in a safetensors file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    key: str | None = None
    handle: _SafetensorsHandle | None = None
    tensor: torch.Tensor | None = None

    @classmethod
    def from_tensor(cls, t: torch.Tensor, key: str | None = None) -> TensorRef:
        return cls(shape=tuple(t.shape), dtype=t.dtype, key=key, tensor=t)

    @classmethod
    def in_file(cls, handle: _SafetensorsHandle, key: str, shape, dtype: torch.dtype) -> TensorRef:
        return cls(shape=tuple(int(s) for s in shape), dtype=dtype, key=key, handle=handle)

    def load(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None, *,
             check: bool = True) -> torch.Tensor:
        """The tensor (cast/moved when asked).  A floating-point tensor read from a file with a NaN or an
        infinity is a :class:`FormatError` naming the file and the tensor: no LoRA holds one, and every
        command would otherwise pass it on (into a merged file) or fail deep inside ``torch.linalg``.
        (In-memory tensors are the caller's; the merge checks its results.)  ``check=False`` skips the
        check, for a caller that checks what it makes from the tensor (the merge's direct kernels)."""
        if self.tensor is not None:
            t = self.tensor
        else:
            t = self.handle.get(self.key)  # type: ignore[union-attr]
            if check and t.is_floating_point() and not all_finite(t):
                raise FormatError(f"tensor {_short(self.key)} holds NaN or infinite values", self.handle.path)
        if dtype is not None or device is not None:
            wider = dtype is not None and t.is_floating_point() and t.dtype.itemsize > dtype.itemsize
            src = t
            t = t.to(dtype=dtype or t.dtype, device=device or t.device)
            if check and wider and self.handle is not None and not all_finite(t):  # finite in the file only
                big = float(src.abs().max())
                raise FormatError(f"tensor {_short(self.key)} holds values up to {big:.3g}, beyond the range of "
                                  f"{str(dtype).replace('torch.', '')} (±{torch.finfo(dtype).max:.3g}) that the "
                                  "math runs in", self.handle.path)
        return t

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class LoraModule:
    """One LoRA'd layer: ``down`` = A (``r × d_in`` or ``r × c_in × kh × kw``), ``up`` = B (``d_out × r``[×1×1])."""

    name: str
    down: TensorRef
    up: TensorRef
    alpha: float | None = None
    scale_rule: ScaleRule = "standard"
    #: original key prefix in the source file (for messages and diffs)
    source_key: str | None = None
    #: a bias delta (LyCORIS/ComfyUI ``diff_b``, shape ``(d_out,)``): the layer's bias becomes ``b + bias``
    #: at the adapter's strength, with no LoRA scale (as LyCORIS and ComfyUI apply it)
    bias: TensorRef | None = None

    def __post_init__(self) -> None:
        # one rule for every command: a rank-0 module (empty factors) is an error naming the file and module
        if self.down is not None and len(self.down.shape) >= 1 and self.down.shape[0] == 0:
            where = self.down.handle.path if self.down.handle is not None else None
            raise FormatError(f"module {_short(self.source_key or self.name)}: rank 0 (empty LoRA factors); "
                              "no LoRA has one — remove the module's tensors", where)

    # ---- shape facts (from the header only) ----
    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def kind(self) -> ModuleKind:
        if len(self.down.shape) == 4:
            kh, kw = self.down.shape[2], self.down.shape[3]
            return "conv1x1" if (kh, kw) == (1, 1) else "conv"
        return "linear"

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        """Flattened input size (``c_in·kh·kw`` for conv)."""
        return math.prod(self.down.shape[1:])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base layer's weight that ΔW adds to."""
        if len(self.down.shape) == 4:
            return (self.out_features, *self.down.shape[1:])
        return (self.out_features, int(self.down.shape[1]))

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else float(self.alpha)

    @property
    def scale(self) -> float:
        r = self.rank
        if r == 0:
            return 0.0
        a = self.effective_alpha
        return a / math.sqrt(r) if self.scale_rule == "rslora" else a / r

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    @property
    def num_params(self) -> int:
        return self.down.numel + self.up.numel + (self.bias.numel if self.bias is not None else 0)

    # ---- tensor access (loads) ----
    def factors(self, dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` flattened to 2-D (``d_out × r``, ``r × d_in``), unscaled."""
        a = self.down.load(dtype, device).reshape(self.rank, -1)
        b = self.up.load(dtype, device).reshape(self.out_features, self.rank)
        return b, a

    def delta(self, dtype: torch.dtype = torch.float32, device=None, flat: bool = True) -> torch.Tensor:
        """Dense ``ΔW = scale · B · A`` (computed in ``dtype``, fp32 by default)."""
        b, a = self.factors(dtype, device)
        d = (b * self.scale) @ a
        return d if flat else d.reshape(self.weight_shape)

    @classmethod
    def from_tensors(
        cls,
        name: str,
        down: torch.Tensor,
        up: torch.Tensor,
        alpha: float | None = None,
        scale_rule: ScaleRule = "standard",
    ) -> LoraModule:
        return cls(name, TensorRef.from_tensor(down), TensorRef.from_tensor(up), alpha, scale_rule)

    @classmethod
    def from_factors(
        cls, name: str, up: torch.Tensor, down: torch.Tensor, weight_shape: tuple[int, ...], dtype: torch.dtype
    ) -> LoraModule:
        """A module with ``ΔW = up @ down`` exactly (alpha = rank, so scale 1: the strength lives in the
        factors), reshaped for a conv ``weight_shape`` and stored as ``dtype`` on the CPU.  A rank-0 update
        is written as rank 1 with zero factors (loaders reject rank 0)."""
        k = int(up.shape[1])
        if k == 0:
            up, down, k = up.new_zeros(up.shape[0], 1), down.new_zeros(1, down.shape[1]), 1
        if len(weight_shape) == 4:
            down = down.reshape(k, *weight_shape[1:])
            up = up.reshape(weight_shape[0], k, 1, 1)
        down = down.detach().to("cpu", dtype).contiguous()
        up = up.detach().to("cpu", dtype).contiguous()
        return cls.from_tensors(name, down, up, alpha=float(k))


@dataclass
class Adapter:
    """A LoRA adapter: modules keyed by canonical path, plus non-LoRA tensors and metadata."""

    modules: dict[str, LoraModule] = field(default_factory=dict)
    #: full tensors that are not LoRA deltas (PEFT ``modules_to_save``), keyed by canonical tensor name
    #: such as ``classifier.weight``
    extra_tensors: dict[str, TensorRef] = field(default_factory=dict)
    #: safetensors ``__metadata__`` (string → string)
    metadata: dict[str, str] = field(default_factory=dict)
    #: dialect the file came from: "kohya", "diffusers" or "peft" (the writer names)
    dialect: str | None = None
    #: finer variant for display, e.g. "kohya-sgm", "diffusers-attn-processor", "diffusers-lora-compatible"
    dialect_variant: str | None = None
    source: Path | None = None
    #: PEFT ``adapter_config.json`` (or diffusers ``lora_adapter_metadata``) when there was one
    config: dict | None = None
    #: keys that could not be parsed (reported as a warning, or an error with --strict)
    unparsed_keys: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, name: str) -> LoraModule:
        return self.modules[name]

    def __contains__(self, name: str) -> bool:
        return name in self.modules

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self) + sum(t.numel for t in self.extra_tensors.values())

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self]

    @property
    def display_name(self) -> str:
        return os.fspath(self.source) if self.source is not None else "<in-memory adapter>"

    def materialize(self) -> Adapter:
        """Load every tensor into memory (e.g. before the source file is overwritten)."""
        for m in self:
            m.down = TensorRef.from_tensor(m.down.load(), m.down.key)
            m.up = TensorRef.from_tensor(m.up.load(), m.up.key)
            if m.bias is not None:
                m.bias = TensorRef.from_tensor(m.bias.load(), m.bias.key)
        for k, t in list(self.extra_tensors.items()):
            self.extra_tensors[k] = TensorRef.from_tensor(t.load(), t.key)
        return self
