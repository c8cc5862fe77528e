"""The mask solvers of the pair-mask strategies, picked with ``--mode``.

- ``weights`` (:class:`WeightSpaceSolver`): the per-layer weight-space objective of :mod:`lora_merge.masks`
  from the two files alone, in closed form and refined with Adam vectorized over all layers;
- ``model``: trained through the diffusion model on reference images
  (``lora_merge.model_mode.solver:ModelSolver``), resolved by name so that importing the strategies never
  imports diffusers.

A solver takes ``(MaskObjective, plan, References | None, SolveOptions)`` and returns a
:class:`~lora_merge.masks.MaskSolution`; :func:`register_solver` adds one (``"module:attr"`` of a class
with a no-argument constructor and a ``solve`` method).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from .. import masks as M
from ..errors import UsageError
from ..formats.dit_arch import FAMILIES as DIT_FAMILIES
from ..masks import LayerMasks, MaskObjective, MaskSolution, MaskSolver, References, SolveOptions
from ..plugins import resolve
from ..priors import LayerPriors, load_priors
from .base import LayerContext, LayerInput, MergePlan

__all__ = [
    "SOLVERS",
    "WeightSpaceSolver",
    "content_style_factors",
    "get_solver",
    "inputs_key",
    "register_solver",
    "resolve",
    "weight_space_priors",
]

#: solver name → ``"module:attr"`` of its class (the weight-space one is built in)
SOLVERS: dict[str, str] = {
    "weights": "lora_merge.strategies.mask_solvers:WeightSpaceSolver",
    "model": "lora_merge.model_mode.solver:ModelSolver",
}




def register_solver(name: str, ref: str) -> None:
    """Add a mask solver under ``--mode NAME`` (``ref``: ``"module:Class"``)."""
    SOLVERS[name] = ref


def get_solver(name: str) -> MaskSolver:
    if name not in SOLVERS:
        raise UsageError(f"unknown mask solver --mode {name!r}; known: {', '.join(SOLVERS)}")
    return resolve(SOLVERS[name])()


def content_style_factors(inputs: Sequence[LayerInput]):
    """The pair convention of every two-input content–style strategy (``ziplora``, ``duolora``,
    ``np-lora``): input 1 is the content LoRA, input 2 the style LoRA.  Returns
    ``(B_c, w_c s_c A_c, B_s, w_s s_s A_s)`` with the strength applied once, on the down factors; an input
    that is absent or weighted 0 contributes rank-0 factors."""
    c, s = inputs
    ac, as_ = c.down * c.coeff, s.down * s.coeff
    if not c.present or c.coeff == 0:
        ac = c.down.new_zeros(0, c.down.shape[1])
    if not s.present or s.coeff == 0:
        as_ = s.down.new_zeros(0, s.down.shape[1])
    return c.up[:, : ac.shape[0]], ac, s.up[:, : as_.shape[0]], as_


def inputs_key(inputs: Sequence[LayerInput]) -> tuple:
    """What a layer's masks were solved for (presence, coefficient and shapes of each input)."""
    return tuple((x.present, float(x.coeff), tuple(x.up.shape), tuple(x.down.shape)) for x in inputs)


def weight_space_priors(spec: Any, arch: str | None) -> LayerPriors | None:
    """The layer-priors table a weight-space solve uses for ``arch`` (None: the objective has no priors).
    ``measure`` must have been measured already (a ``LayerPriors``); ``auto`` is the resolution rule of the
    architecture, which a DiT does not have (an error, never a guess)."""
    if spec is None or isinstance(spec, LayerPriors):
        return spec
    if spec == "measure":
        raise UsageError("--priors measure: the priors are measured in prepare(), which has not run")
    if spec == "none":
        return LayerPriors(source="none")
    if spec == "auto" and arch in DIT_FAMILIES:  # no UNet resolutions, so no DuoLoRA priors
        family = DIT_FAMILIES[arch]  # what it offers instead comes from the family's own declaration
        table = (f"--priors {' / '.join(family.priors)} or a priors file" if family.priors else "--priors FILE")
        loadable = [f.short or f.display for f in DIT_FAMILIES.values() if f.pipeline_loader]
        base = ("--base: its diffusers pipeline folder, with --content-images/--content-prompt/--style-images/"
                "--style-prompt" if family.pipeline_loader else
                "--base: a model registered with register_base_model; only "
                f"{', '.join(loadable[:-1])} and {loadable[-1]} pipeline folders load")
        raise UsageError(
            f"duolora: DuoLoRA's resolution priors do not exist for a DiT ({DIT_FAMILIES[arch].display} has no "
            f"UNet resolutions); give a block table ({table}) or --priors measure on a base model you supply "
            f"({base})")
    if spec == "auto" and arch is None:
        warnings.warn("duolora: the architecture is unknown, so every layer is neutral (no layer priors); "
                      "pass --arch or --priors", stacklevel=3)  # fmt: skip
        return LayerPriors(source="none (architecture unknown)")
    return load_priors(spec, arch)


class WeightSpaceSolver:
    """``--mode weights``: every layer's masks from the two files alone.  :meth:`solve` solves the plan's
    layers up front (Adam vectorized over all of them); :meth:`solve_layer` solves one layer on demand
    (the layers another solver could not reach, or inputs that changed since)."""

    name = "weights"

    def __init__(self) -> None:
        self._tables: dict[Any, LayerPriors | None] = {}
        self.priors_source: str | None = None  # the source of the last priors table used

    def solve(self, objective: MaskObjective, plan: MergePlan, references: References | None,
              options: SolveOptions) -> MaskSolution:  # fmt: skip
        setups = []
        for layer in plan.layers():
            layer_in = plan.layer_inputs(layer)
            problem, init, info = self.setup(objective, layer_in, layer.ctx)
            z, t_init, t_cf = M.start(problem, init, objective.closed_form)
            setups.append((layer.ctx.name, inputs_key(layer_in), problem, info, z, t_init, t_cf))
        refined = M.refine_many([x[2] for x in setups], [x[4] for x in setups], objective.steps, objective.lr)
        layers = {}
        for (name, key, problem, info, _z, t_init, t_cf), (z, best_t) in zip(setups, refined):
            sol = M.finish(problem, z, best_t, t_init, t_cf)
            layers[name] = LayerMasks(sol.mask_c, sol.mask_s, info=info, solution=sol, key=key)
        return MaskSolution(layers=layers, solver=self.name, priors_source=self.priors_source)

    def solve_layer(self, objective: MaskObjective, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerMasks:
        problem, init, info = self.setup(objective, inputs, ctx)
        sol = M.solve(problem, init, closed_form=objective.closed_form, steps=objective.steps, lr=objective.lr)
        return LayerMasks(sol.mask_c, sol.mask_s, info=info, solution=sol, key=inputs_key(inputs))

    def setup(self, objective: MaskObjective, inputs: Sequence[LayerInput], ctx: LayerContext):
        """``(MaskProblem, initial masks or None for ones, report info)`` of one layer."""
        bc, ac, bs, as_ = content_style_factors(inputs)
        role, score, info = "neutral", 0.0, {}
        table = self._table(objective, ctx.arch)
        if table is not None:
            role = table.role_of(ctx.name)
            score = table.score_of(ctx.name) if role != "neutral" else 0.0
            info = {"role": role, "prior_score": score}
        init = None
        if objective.prior_init and table is not None:
            init = M.prior_init(ac.shape[0], as_.shape[0], role, ctx.generator(objective.init_salt))
        problem = M.build_problem(objective.axis_for(ctx.name), bc, ac, bs, as_, objective.input_model, ctx.name,
                                  **objective.problem_weights(role, score))  # fmt: skip
        info["trainable_values"] = problem.num_values
        return problem, init, info

    def _table(self, objective: MaskObjective, arch: str | None) -> LayerPriors | None:
        key = (id(objective.priors), arch)
        if key not in self._tables:
            self._tables[key] = weight_space_priors(objective.priors, arch)
        table = self._tables[key]
        if table is not None:
            self.priors_source = table.source
        return table
