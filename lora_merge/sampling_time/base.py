"""The ``SamplingTimeMerger`` interface: a method that combines a content and a style LoRA *while
sampling* (per layer and per denoising step), so that no single LoRA file can hold the result.

A merger declares itself once, as a file strategy does (:class:`lora_merge.strategies.MergeStrategy`):
``name``, one-line ``description``, ``reference`` and its :class:`~lora_merge.strategies.Param` tuple.
The constructor's keyword arguments, their defaults, ``lora-merge strategies NAME [--json]`` and the
benchmark rows' settings all come from that declaration; ``describe()`` is the listing.  The hooking
itself is :class:`~lora_merge.sampling_time.hooks.LayerHooks`: a merger implements ``step_record(t)``
(what each layer does at timestep ``t``) and ``layer_extra(layer, record, x)`` (what it adds).

Besides ``float`` / ``int`` / ``str`` / ``bool``, a ``Param`` type here may be a :class:`ParamType`:
:data:`STRENGTHS` (a ``(content, style)`` pair: ``(1.0, 0.25)`` in Python, ``[1.0, 0.25]`` in a recipe
or JSON, ``"1,0.25"`` as text) and :data:`FLOAT_OR_AUTO`.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from ..adapter import Adapter
from ..errors import UsageError
from ..strategies.base import Param, declaration
from .hooks import LayerHooks, collect_layers

__all__ = [
    "FLOAT_OR_AUTO",
    "NUM_TRAIN_TIMESTEPS",
    "STRENGTHS",
    "WEIGHTS",
    "ParamType",
    "SamplingTimeMerger",
    "param_info",
]


class ParamType:
    """A :class:`~lora_merge.strategies.Param` type beyond ``float``/``int``/``str``/``bool``: a parser
    (``TYPE(value)``; it raises ``TypeError``/``ValueError`` on a bad value), the name ``lora-merge
    strategies`` shows and what a bad value's message says it expects."""

    def __init__(self, name: str, expects: str, parse: Callable[[Any], Any]):
        self.__name__ = name  # what Param.coerce and describe() print
        self.expects = expects
        self._parse = parse

    def __call__(self, value: Any) -> Any:
        return self._parse(value)

    def __repr__(self) -> str:
        return f"ParamType({self.__name__!r})"


def _two_floats(value: Any) -> tuple[float, float]:
    items = value.split(",") if isinstance(value, str) else list(value)
    if len(items) != 2:
        raise ValueError(f"{len(items)} values")
    return float(items[0]), float(items[1])


def _float_or_auto(value: Any) -> float | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise TypeError(value)
    return float(value)


#: ``(content, style)``: two numbers, from a pair or the text ``"a,b"``
STRENGTHS = ParamType("(float, float)", "two strengths (content, style): a pair of numbers or 'a,b'",
                      _two_floats)
#: a number, or the word ``auto`` (the merger computes it)
FLOAT_OR_AUTO = ParamType("float | 'auto'", "a number or 'auto'", _float_or_auto)

#: every two-LoRA merger's user strengths (the benchmark passes them to each merger)
WEIGHTS = Param("weights", STRENGTHS, (1.0, 1.0),  # type: ignore[arg-type]
                "strengths w_c, w_s of the two LoRAs: ΔW_i = w_i · (alpha_i / r_i) · B_i A_i")
#: T of the schedule's p = 1 − t/T when the attach gives neither a scheduler nor num_train_timesteps
NUM_TRAIN_TIMESTEPS = Param("num_train_timesteps", float, None,
                            "T; default scheduler.config.num_train_timesteps, else 1000 (Flux pipelines call "
                            "the transformer with t/1000: give 1)")

_PLAIN = (float, int, str, bool)


def coerce_param(merger: str, p: Param, value: Any) -> Any:
    """``value`` as ``p`` declares it (its type, range and choices); a bad one is a one-line
    :class:`UsageError` that names the merger and the parameter."""
    if isinstance(p.type, ParamType):
        try:
            return p.type(value)
        except (TypeError, ValueError):
            raise UsageError(f"{merger}: parameter {p.name!r} takes {p.type.expects}, got {value!r}") from None
    try:
        return p.coerce(value)
    except UsageError as exc:
        raise UsageError(f"{merger}: {exc}") from None


def _json_value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def param_info(p: Param) -> dict[str, Any]:
    """One parameter as ``describe()`` lists it: the keys of ``MergeStrategy.describe``'s but ``option``
    (a sampling-time merger takes its parameters as Python keywords, never as ``merge`` options); JSON
    values (a pair default is a list)."""
    info = p.describe()
    del info["option"]
    return info


class _AttachMethod:
    """``Merger.attach(model, content, style, **params)`` builds and attaches; ``instance.attach(model)``
    attaches an instance built earlier (what ``toyworld.sampling.sample(merger=...)`` calls)."""

    def __get__(self, obj, cls):
        if obj is None:
            def build_and_attach(model: nn.Module, content: Adapter, style: Adapter, *, scheduler: Any = None,
                                 **params: Any):
                return cls(content, style, **params).attach_hooks(model, scheduler=scheduler)

            return build_and_attach
        return functools.partial(cls.attach_hooks, obj)


class SamplingTimeMerger(LayerHooks):
    """Base class.  A subclass sets ``name``, ``description``, ``reference`` and ``params`` (its
    :class:`~lora_merge.strategies.Param` tuple, usually ending with :data:`WEIGHTS` and
    :data:`NUM_TRAIN_TIMESTEPS`, which this class reads), may override :meth:`setup` (called once the
    layers are lined up; read ``self.config``), and implements ``step_record(t)`` and
    ``layer_extra(layer, record, x)`` (see :class:`~lora_merge.sampling_time.hooks.LayerHooks`).

    ``Merger(content, style, **params)`` builds one unattached (``params``: the declared names; a missing
    one takes its ``Param`` default); ``.attach(model, scheduler=...)`` binds it, ``.detach()`` restores
    the model, and ``Merger.attach(model, content, style, scheduler=..., **params)`` does both.
    ``self.config`` holds every parameter as given (defaults filled in, values coerced)."""

    name: ClassVar[str]
    description: ClassVar[str]
    reference: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = (WEIGHTS, NUM_TRAIN_TIMESTEPS)
    #: a LoRA file can never hold a sampling-time merge (``merge -s NAME`` refuses it)
    static_file: ClassVar[bool] = False
    #: the name at the start of its error messages (a subclass that sets none gets its ``name``)
    label: ClassVar[str] = "sampling-time merger"

    attach = _AttachMethod()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("label") and getattr(cls, "name", None):
            cls.label = cls.name
        kw = inspect.Parameter.KEYWORD_ONLY
        cls.__signature__ = inspect.Signature(  # help() and IDEs show the declared defaults
            [inspect.Parameter("content", inspect.Parameter.POSITIONAL_OR_KEYWORD),
             inspect.Parameter("style", inspect.Parameter.POSITIONAL_OR_KEYWORD),
             *(inspect.Parameter(p.name, kw, default=p.default) for p in cls.params),
             inspect.Parameter("device", kw, default=None)])

    def __init__(self, content: Adapter, style: Adapter, *, device: Any = None, **params: Any):
        self.config: dict[str, Any] = self.resolve(params)
        self.content, self.style = content, style
        self.weights: tuple[float, float] = tuple(self.config.get("weights", WEIGHTS.default))  # type: ignore[assignment]
        nt = self.config.get("num_train_timesteps")
        self.num_train_timesteps = None if nt is None else float(nt)
        self.layers, self.skipped = collect_layers(self.label, content, style, self.weights)
        self.init_hooks()
        self.setup(device)

    @classmethod
    def resolve(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Every declared parameter: ``params`` coerced, the declared default where one is missing (or
        None); an unknown name raises :class:`UsageError` listing the known ones."""
        known = {p.name: p for p in cls.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise UsageError(f"{cls.label}: no parameter {unknown[0]!r} (it takes: {', '.join(known) or 'none'})")
        return {p.name: p.default if params.get(p.name) is None else coerce_param(cls.label, p, params[p.name])
                for p in cls.params}

    def setup(self, device: Any = None) -> None:
        """Called at the end of ``__init__`` (``self.config``, ``self.layers`` are set); ``device`` is
        where to compute anything dense.  Default: nothing."""

    @classmethod
    def api(cls) -> str:
        """One line of Python that uses it (what ``lora-merge merge -s NAME`` points to)."""
        n = cls.__name__
        return f"from {cls.__module__} import {n}; {n}.attach(pipe.unet, content, style) ... .detach()"

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The listing of ``lora-merge strategies`` (and its torch-free catalogue), from the declaration."""
        return declaration(cls, {"static_file": cls.static_file, "api": cls.api()},
                           [param_info(p) for p in cls.params])

    def report(self) -> dict[str, Any]:
        """JSON-ready: the method, its settings and per model call the record."""
        return {"method": self.name, **{k: _json_value(v) for k, v in self.config.items()},
                "num_train_timesteps": self.T, "skipped_modules": list(self.skipped),
                "steps": [{"timestep": r.timestep, "progress": r.progress, "choices": dict(r.choices)}
                          for r in self.records]}
