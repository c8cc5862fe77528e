"""The ``MergeStrategy`` plug-in interface.

A strategy declares itself once — name, one-line description, reference, exactness and its
:class:`Param` list — and the CLI options, recipe-file keys and ``lora-merge strategies NAME`` are
all generated from that declaration.  The engine lines up the modules of N adapters in a
:class:`MergePlan`, hands the plan to :meth:`MergeStrategy.prepare` once, and calls
:meth:`MergeStrategy.merge_layer` once per layer with fp32 factors on the chosen device.

Strength semantics are the engine's job: the plan answers "which inputs, which coefficient, which context
at layer L" in one place, and each :class:`LayerInput` carries its LoRA scale (``alpha/r``) and the user
weight separately; ``LayerInput.delta()`` is ``weight · scale · B · A``.  A strategy never computes a
coefficient or builds a :class:`LayerContext` itself.

Optional hooks, all with a default here: :meth:`~MergeStrategy.direct_kernel` (a fast path that writes
output modules straight from the stored factors, as ``linear`` offers), :meth:`~MergeStrategy.sidecars`
(extra files next to the output, e.g. learned masks) and :meth:`~MergeStrategy.report`.
"""
from __future__ import annotations

import hashlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

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

    def describe(self) -> dict[str, Any]:
        """JSON-ready: name, option, type, default, help, range, choices (what ``strategies --json`` lists)."""
        default = list(self.default) if isinstance(self.default, tuple) else self.default
        return {"name": self.name, "option": self.option, "type": self.type.__name__, "default": default,
                "help": self.help, "range": list(self.range) if self.range else None,
                "choices": list(self.choices) if self.choices else None}  # fmt: skip

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
    rank: int | None = None  # the requested output rank (``--rank``), None: exact
    input_names: tuple[str, ...] = ()  # display names of the inputs, in order

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


@dataclass(frozen=True)
class PlannedLayer:
    """One layer of a merge plan: its context and each input's coefficient (user weight × matching
    ``--weight`` patterns; the LoRA's own scale is applied by :class:`LayerInput`)."""

    ctx: LayerContext
    coeffs: tuple[float, ...]


class MergePlan(Protocol):
    """What the engine hands to :meth:`MergeStrategy.prepare` (implemented by ``lora_merge.engine``)."""

    adapters: Sequence[Any]  # the loaded :class:`~lora_merge.adapter.Adapter` inputs, in order
    names: Sequence[str]  # their display names
    arch: str | None
    seed: int
    device: torch.device
    rank: int | None
    allow_pickle: bool  # whether a solver may unpickle a base model (``--allow-pickle``)

    def layers(self) -> Iterator[PlannedLayer]:
        """Every layer in plan order."""
        ...

    def layer(self, name: str) -> PlannedLayer:
        """One layer by module name."""
        ...

    def coeffs(self, name: str) -> tuple[float, ...]:
        """Each input's coefficient at the layer ``name`` (also for names outside the plan)."""
        ...

    def layer_inputs(self, layer: PlannedLayer) -> list[LayerInput]:
        """The fp32 factors of every input at ``layer`` on the plan's device (a rank-0 input when absent)."""
        ...


class DirectKernel(Protocol):
    """A strategy's fast path: output modules straight from the stored factors (see ``linear``).  It may
    read the factors unchecked (``TensorRef.load(check=False)``): the engine checks every output factor
    for NaN/Inf and, when one is not finite, re-reads that layer's inputs with the check, which names the
    file."""

    #: True when a layer is real arithmetic worth a worker thread (False: a copy)
    heavy: bool

    def applies(self, layer: PlannedLayer) -> bool:
        """False when this layer needs the general path (:meth:`MergeStrategy.merge_layer`)."""
        ...

    def layer(self, layer: PlannedLayer) -> tuple[Any, bool]:
        """``(LoraModule in the output dtype, refactored)`` of a layer for which :meth:`applies` holds."""
        ...


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
    #: the suffixes :meth:`sidecars` may return (so the engine can check those paths before any work)
    sidecar_suffixes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each declared parameter is also a read-only property that reads ``self.config`` (``self.density``
        is ``self.config["density"]``), made here from ``params`` so it is visible on the class."""
        super().__init_subclass__(**kwargs)
        for p in cls.__dict__.get("params", ()):
            if not hasattr(cls, p.name):
                setattr(cls, p.name, property(lambda self, _n=p.name: self.config[_n], doc=p.help))

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

    # ---- hooks ----
    def prepare(self, plan: MergePlan) -> None:
        """Called once before the first layer with the merge plan (strategies that solve all layers at
        once, such as ``ziplora``, do it here)."""

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        raise NotImplementedError

    def direct_kernel(self, plan: MergePlan, out_dtype: torch.dtype, tol: float) -> DirectKernel | None:
        """A fast path the engine may use instead of :meth:`merge_layer` for the layers it applies to
        (CPU merges without a retention report); ``tol`` is the re-factorization accuracy the output dtype
        needs.  Default: none."""
        return None

    def sidecars(self) -> dict[str, dict[str, torch.Tensor]]:
        """Extra tensors to save next to the output after the last layer: ``{suffix: {key: tensor}}`` is
        written as ``<output>.<suffix>.safetensors``.  Default: none."""
        return {}

    def report(self) -> dict[str, Any]:
        """Strategy-level report (after the last layer), merged into the merge report."""
        return {}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return declaration(cls, {"exact": cls.exact})


def declaration(cls: Any, extra: dict[str, Any], params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A declared class (a strategy or a sampling-time merger) as ``lora-merge strategies --json`` lists it:
    name, description, reference, ``extra``, and its parameters (default: each ``Param.describe()``)."""
    return {"name": cls.name, "description": cls.description, "reference": cls.reference, **extra,
            "params": params if params is not None else [p.describe() for p in cls.params]}  # fmt: skip


def takes_legacy_prepare(strategy: MergeStrategy) -> bool:
    """True for a strategy written against the old ``prepare(inputs, context)`` hook (deprecated)."""
    fn = type(strategy).prepare
    if fn is MergeStrategy.prepare:
        return False
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY,
                                                                                p.POSITIONAL_OR_KEYWORD)]
    return len(params) == 3  # self, inputs, context


def call_prepare(strategy: MergeStrategy, plan: MergePlan, legacy_context: dict[str, Any]) -> None:
    """``strategy.prepare(plan)``; a strategy with the old ``prepare(inputs, context)`` signature gets the
    loaded adapters and the old context dict, with a :class:`DeprecationWarning`."""
    if takes_legacy_prepare(strategy):
        warnings.warn(
            f"strategy {strategy.name!r}: prepare(inputs, context) is deprecated; override prepare(plan) "
            "(plan.adapters, plan.layers(), plan.coeffs(name)) instead",
            DeprecationWarning,
            stacklevel=3,
        )
        strategy.prepare(list(plan.adapters), legacy_context)  # type: ignore[call-arg]
    else:
        strategy.prepare(plan)
