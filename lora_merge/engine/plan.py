"""The merge plan: the inputs lined up module by module, and the one answer to "which inputs, which
coefficient, which context at layer L".

:class:`Plan` implements the :class:`~lora_merge.strategies.MergePlan` protocol that strategies read
in ``prepare(plan)``: the union of the inputs' modules in first-seen order (shape conflicts are an
error, a module missing from an input is a zero update for it), each layer's :class:`LayerContext` and
coefficients (global weight × every matching ``--weight`` pattern), and the fp32 :class:`LayerInput`
of every input at a layer.  The non-LoRA tensors (PEFT ``modules_to_save``, e.g. classifier heads) are
lined up here too.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any

import torch

from .. import arch as arch_facts
from ..adapter import Adapter, LoraModule, TensorRef
from ..errors import MergeError, MissingModuleWarning
from ..patterns import compile_pattern
from ..strategies import LayerContext, LayerInput, PlannedLayer

__all__ = ["Plan"]


def _shape(s) -> str:
    return "×".join(str(int(x)) for x in s)


class Plan:
    """The modules of N adapters lined up for a merge (see the module docstring)."""

    def __init__(
        self,
        adapters: Sequence[Adapter],
        names: Sequence[str],
        *,
        weights: Sequence[float],
        layer_weights: Sequence[tuple[str, Sequence[float]]] = (),
        arch: str | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int | None = None,
        allow_mixed_arch: bool = False,
        allow_pickle: bool = False,
    ):
        self.adapters = list(adapters)
        self.names = list(names)
        self.weights = [float(w) for w in weights]
        self.layer_weights = [(p, [float(v) for v in vals]) for p, vals in layer_weights]
        self._rules = [(compile_pattern(p), vals) for p, vals in self.layer_weights]
        self.arch = arch if arch is not None else arch_facts.guess_arch(self.adapters[0])
        self.seed = int(seed)
        self.device = torch.device(device)
        self.rank = rank
        self.allow_pickle = bool(allow_pickle)  # what a model-mode solver may unpickle from --base
        if not allow_mixed_arch:
            problem = arch_facts.mixed_arch_problem(self.adapters, self.names)
            if problem:
                raise MergeError(problem + " (--allow-mixed-arch merges them anyway)")
        self.modules = self._line_up()
        if not self.modules:
            raise MergeError("the inputs contain no LoRA modules to merge")
        self._warn_missing()

    # ---------------------------------------------------------------- lining up
    def _line_up(self) -> list[str]:
        order: dict[str, int] = {}
        for ad in self.adapters:
            for n in ad.modules:
                order.setdefault(n, len(order))
        for name in order:
            first = None
            for i, ad in enumerate(self.adapters):
                m = ad.modules.get(name)
                if m is None:
                    continue
                if first is None:
                    first = (i, m)
                elif m.weight_shape != first[1].weight_shape:
                    j, fm = first
                    fam_j, fam_i = (arch_facts.arch_family(self.adapters[k])[2] for k in (j, i))
                    guess = (f"input {j + 1} looks like {fam_j}, input {i + 1} like {fam_i}"
                             if fam_i != fam_j else "e.g. SD 1.x and SD 2.x, or SD 1.x and SDXL")
                    raise MergeError(
                        f"module {name} has weight shape {_shape(fm.weight_shape)} in input {j + 1} "
                        f"({self.names[j]}) but {_shape(m.weight_shape)} in input {i + 1} ({self.names[i]}); "
                        f"are these LoRAs for different base models ({guess})?"
                    )
        return list(order)

    def _warn_missing(self) -> None:
        if len(self.adapters) < 2:
            return
        for i, ad in enumerate(self.adapters):
            missing = [n for n in self.modules if n not in ad.modules]
            if missing:
                warnings.warn(
                    MissingModuleWarning(
                        f"{len(missing)} of {len(self.modules)} merged module(s) are absent from input {i + 1} "
                        f"({self.names[i]}), e.g. {missing[0]}; treated as zero updates"
                    ),
                    stacklevel=4,
                )

    # ---------------------------------------------------------------- the MergePlan protocol
    def coeffs(self, name: str) -> tuple[float, ...]:
        coeffs = list(self.weights)
        for rx, vals in self._rules:
            if rx.search(name):
                coeffs = [c * v for c, v in zip(coeffs, vals)]
        return tuple(coeffs)

    def shape_module(self, name: str) -> LoraModule:
        """The first input's module of that name (its shape and kind stand for all inputs')."""
        return next(ad.modules[name] for ad in self.adapters if name in ad.modules)

    @cached_property
    def _layers(self) -> dict[str, PlannedLayer]:
        out = {}
        for idx, name in enumerate(self.modules):
            m = self.shape_module(name)
            ctx = LayerContext(
                name=name,
                index=idx,
                block=arch_facts.sub_block_of(name),
                resolution=arch_facts.resolution_of(name, self.arch),
                arch=self.arch,
                kind=m.kind,
                weight_shape=tuple(m.weight_shape),
                seed=self.seed,
                device=self.device,
                dtype=torch.float32,
                rank=self.rank,
                input_names=tuple(self.names),
            )
            out[name] = PlannedLayer(ctx=ctx, coeffs=self.coeffs(name))
        return out

    def layers(self) -> Iterator[PlannedLayer]:
        return iter(self._layers.values())

    def layer(self, name: str) -> PlannedLayer:
        return self._layers[name]

    def __len__(self) -> int:
        return len(self.modules)

    def layer_inputs(self, layer: PlannedLayer) -> list[LayerInput]:
        name = layer.ctx.name
        m0 = self.shape_module(name)
        d_out, d_in, dev = m0.out_features, m0.in_features, self.device
        res = []
        for ad, w in zip(self.adapters, layer.coeffs):
            m = ad.modules.get(name)
            if m is None:
                z = torch.zeros
                res.append(LayerInput(z(d_out, 0, device=dev), z(0, d_in, device=dev), 0.0, w, present=False))
                continue
            b, a = m.factors(torch.float32, dev)
            res.append(LayerInput(up=b, down=a, scale=m.scale, weight=w))
        return res

    def check_inputs(self, name: str) -> None:
        """Read every input's factors of layer ``name`` with the NaN/Inf check (a :class:`FormatError`
        naming the file when one is not finite)."""
        for ad in self.adapters:
            m = ad.modules.get(name)
            if m is not None:
                m.up.load()
                m.down.load()

    def legacy_context(self) -> dict[str, Any]:
        """The context dict of the deprecated ``prepare(inputs, context)`` hook."""
        return {
            "arch": self.arch,
            "seed": self.seed,
            "device": self.device,
            "weights": list(self.weights),
            "layer_weights": [(p, list(v)) for p, v in self.layer_weights],
            "rank": self.rank,
            "names": list(self.names),
            "plan": list(self.modules),
        }

    # ---------------------------------------------------------------- non-LoRA tensors
    def merged_heads(self, keep_heads_from: int | None) -> dict[str, TensorRef]:
        """PEFT ``modules_to_save`` tensors: identical everywhere → kept; different → an error unless
        ``keep_heads_from`` (1-based) names the input whose tensors to keep."""
        adapters, names = self.adapters, self.names
        keep = None if keep_heads_from is None else keep_heads_from - 1
        keys: dict[str, None] = {}
        for ad in adapters:
            keys.update(dict.fromkeys(ad.extra_tensors))
        out: dict[str, TensorRef] = {}
        conflicts = []
        for key in keys:
            have = [(i, ad.extra_tensors[key]) for i, ad in enumerate(adapters) if key in ad.extra_tensors]
            i0, ref0 = have[0]
            t0 = ref0.load()
            differs = None
            for i, ref in have[1:]:
                if ref.shape != ref0.shape or not torch.equal(ref.load().to(t0.dtype), t0):
                    differs = (i, ref)
                    break
            if differs is None:
                out[key] = TensorRef.from_tensor(t0, key)
            elif keep is not None:
                if key in adapters[keep].extra_tensors:
                    out[key] = TensorRef.from_tensor(adapters[keep].extra_tensors[key].load(), key)
            else:
                i, ref = differs
                what = (
                    f"{_shape(ref0.shape)} in input {i0 + 1} vs {_shape(ref.shape)} in input {i + 1}"
                    if ref.shape != ref0.shape
                    else f"same shape {_shape(ref.shape)}, different values in inputs {i0 + 1} and {i + 1}"
                )
                conflicts.append(f"{key} ({what})")
        if conflicts:
            listed = ", ".join(f"{i + 1}={nm}" for i, nm in enumerate(names))
            raise MergeError(
                "the inputs' non-LoRA tensors (PEFT modules_to_save, e.g. classifier heads) conflict "
                f"(inputs {listed}): "
                + "; ".join(conflicts[:3])
                + (f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
                + "; pick one input's with --keep-heads-from N"
            )
        return out
