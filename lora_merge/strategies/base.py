"""The ``MergeStrategy`` plug-in interface.

A strategy declares itself once — name, one-line description, reference, exactness and its
:class:`Param` list — and the CLI options, recipe-file keys and ``lora-merge strategies NAME`` are
all generated from that declaration.  The engine lines up the modules of N adapters and calls
:meth:`MergeStrategy.merge_layer` once per layer with fp32 factors on the chosen device.

Strength semantics are the engine's job: each :class:`LayerInput` carries its LoRA scale
(``alpha/r``) and the user weight separately; ``LayerInput.delta()`` is ``weight · scale · B · A``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import UsageError


@dataclass(frozen=True)
class Param:
    """One strategy parameter.  ``type`` is ``float``, ``int``, ``str`` or ``bool``."""

    name: str
    type: type
    default: Any
    help: str
    range: tuple[float | None, float | None] | None = None
    choices: tuple[str, ...] | None = None

    @property
    def option(self) -> str:
        """The CLI option spelling, e.g. ``--lambda-sim``."""
        return "--" + self.name.replace("_", "-")

    def coerce(self, value: Any, strategy: str = "") -> Any:
        where = f"strategy {strategy!r} parameter {self.name!r}" if strategy else f"parameter {self.name!r}"
        try:
            if self.type is bool and isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = low in ("1", "true", "yes", "on")
            elif value is not None:
                value = self.type(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected {self.type.__name__}, got {value!r}") from None
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"{where}: {value!r} is not one of {', '.join(self.choices)}")
        if self.range is not None and value is not None:
            lo, hi = self.range
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise UsageError(f"{where}: {value!r} is outside [{lo}, {hi}]")
        return value


@dataclass
class LayerInput:
    """One input's factors for one layer, fp32, flattened to 2-D.  A module missing from an input is a
    rank-0 ``LayerInput`` (its update is zero)."""

    up: torch.Tensor  # B: d_out × r
    down: torch.Tensor  # A: r × d_in
    scale: float  # the LoRA's own alpha/r (or alpha/sqrt(r))
    weight: float  # the user's weight for this input at this layer
    present: bool = True

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def coeff(self) -> float:
        """Inference strength multiplier, applied once: ``weight · scale``."""
        return self.weight * self.scale

    def delta(self) -> torch.Tensor:
        """Dense weighted update ``weight · scale · B · A``."""
        return (self.up * self.coeff) @ self.down

    def unweighted_delta(self) -> torch.Tensor:
        """Dense ``scale · B · A`` (the LoRA at strength 1)."""
        return (self.up * self.scale) @ self.down


@dataclass
class LayerContext:
    """Everything a strategy may want to know about the layer it merges."""

    name: str  # canonical module path
    index: int  # position in the merge plan
    block: str | None = None  # e.g. "unet.up_blocks.0.attentions.1"
    resolution: int | None = None  # latent resolution of the block at the architecture's native size
    arch: str | None = None  # "sdxl", "sd1", ... or None
    kind: str = "linear"  # "linear", "conv", "conv1x1"
    weight_shape: tuple[int, ...] = ()
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    extra: dict[str, Any] = field(default_factory=dict)

    def generator(self, salt: str = "") -> torch.Generator:
        """A generator seeded from (seed, layer name, salt): same seed → same bytes, independent of
        layer order or which other layers are merged."""
        h = hashlib.sha256(f"{self.seed}:{self.name}:{salt}".encode()).digest()
        g = torch.Generator(device=self.device)
        g.manual_seed(int.from_bytes(h[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
        return g


@dataclass
class LayerResult:
    """A strategy's answer for one layer: factors (``ΔW = up @ down``, scale already applied) or a dense
    ``ΔW`` that the engine re-factors.  ``info`` goes into the report."""

    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.up is None or self.down is None):
            raise ValueError("LayerResult needs either (up, down) or dense")


class MergeStrategy:
    """Base class.  Subclasses set the class attributes and implement :meth:`merge_layer`."""

    name: ClassVar[str]
    description: ClassVar[str]
    reference: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    params: ClassVar[tuple[Param, ...]] = ()
    #: minimum / maximum number of inputs (None = unbounded)
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int | None] = None

    def __init__(self, **kwargs: Any):
        known = {p.name: p for p in self.params}
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise UsageError(
                f"strategy {self.name!r} has no parameter {unknown[0]!r}"
                + (f" (it takes: {', '.join(known)})" if known else " (it takes none)")
            )
        self.config: dict[str, Any] = {}
        for p in self.params:
            self.config[p.name] = p.coerce(kwargs[p.name], self.name) if kwargs.get(p.name) is not None else p.default

    def __getattr__(self, item: str) -> Any:
        cfg = self.__dict__.get("config")
        if cfg is not None and item in cfg:
            return cfg[item]
        raise AttributeError(item)

    # ---- hooks ----
    def prepare(self, inputs: Sequence[Any], context: dict[str, Any]) -> None:
        """Called once before the first layer with the loaded :class:`~lora_merge.adapter.Adapter` list."""

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """Strategy-level report (after the last layer), merged into the merge report."""
        return {}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "description": cls.description,
            "reference": cls.reference,
            "exact": cls.exact,
            "params": [
                {
                    "name": p.name,
                    "option": p.option,
                    "type": p.type.__name__,
                    "default": p.default,
                    "help": p.help,
                    "range": list(p.range) if p.range else None,
                    "choices": list(p.choices) if p.choices else None,
                }
                for p in cls.params
            ],
        }
