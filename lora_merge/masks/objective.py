"""What a two-LoRA mask strategy asks a solver for, as data.

A pair-mask strategy (``ziplora``, ``duolora``, or a plug-in) turns its declared parameters into one frozen
:class:`MaskObjective`: the mask axis of each layer, the weight of every term, the layer priors that give
each layer a role and a score, and how the masks start.  A solver — picked with ``--mode`` — receives
``(objective, plan, references, options)`` and returns a :class:`MaskSolution`; the strategy folds the
masks.  Two solvers ship: ``weights`` (the per-layer weight-space objective of this package, from the two
files alone) and ``model`` (trained through the diffusion model on reference images).  Neither knows any
strategy by name: everything that differs between strategies is in the objective.

A term a strategy does not have is off (weight 0): ZipLoRA's objective has no prior and no Constyle term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..errors import UsageError
from .problem import AXES

if TYPE_CHECKING:  # pragma: no cover
    from ..input_models import InputModel



@dataclass(frozen=True)
class Concept:
    """One LoRA's reference: its images (a folder, a registered source such as ``toyworld:content``, or an
    ``N×3×H×W`` tensor in [-1, 1]) and the prompt they were trained with."""

    images: Any
    prompt: str


@dataclass(frozen=True)
class References:
    """The content and the style reference of a content–style merge, and the joint prompt of the Constyle
    cycles (default: the two prompts joined)."""

    content: Concept
    style: Concept
    cycle_prompt: str | None = None

    @property
    def joint_prompt(self) -> str:
        return self.cycle_prompt or f"{self.content.prompt} {self.style.prompt}"

    def roles(self) -> tuple[tuple[str, Concept], tuple[str, Concept]]:
        """``(("content", concept), ("style", concept))`` in that order."""
        return (("content", self.content), ("style", self.style))

    def check_prompts(self, what: str) -> None:
        for role, concept in self.roles():
            if not concept.prompt or not str(concept.prompt).strip():
                raise UsageError(f"{what} needs a {role} prompt (--{role}-prompt)")


@dataclass(frozen=True)
class MaskObjective:
    """One merge's mask objective (see the module docstring).

    ``priors`` is the layer-priors spec as the user gave it (``"auto"``, a table name, a file, a measured
    ``LayerPriors``) or None for no priors; each solver resolves it in its own space (weight space: for the
    plan's architecture; model: ``"auto"`` from the model's own block resolutions).  ``prior_init`` starts
    the masks from the priors with a generator seeded per layer from ``(seed, layer, init_salt)``."""

    axis: str  # "out" | "in" | "rank"
    steps: int
    lr: float
    lambda_sim: float
    closed_form: bool = True
    lambda_prior: float = 0.0
    lambda_hinge: float = 1.0
    lambda_cycle: float = 0.0
    lambda_rev: float = 0.0
    priors: Any = None
    prior_init: bool = False
    init_salt: str = "prior-init"
    input_model: InputModel | None = field(default=None, compare=False)  # weight space: each LoRA's inputs

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise UsageError(f"mask axis must be one of {', '.join(AXES)}, got {self.axis!r}")
        if int(self.steps) < 0:
            raise UsageError(f"--steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        for k in ("lambda_sim", "lambda_prior", "lambda_hinge", "lambda_cycle", "lambda_rev"):
            v = float(getattr(self, k))
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"--{k.replace('_', '-')} must be a finite number >= 0, got {v}")

    def axis_for(self, layer: str) -> str:
        """The mask axis at ``layer`` (the same for every layer of the built-in strategies)."""
        return self.axis

    @property
    def has_priors(self) -> bool:
        return self.priors is not None

    def term_weights(self) -> dict[str, float]:
        """Every term's weight in the model-space total (the reconstructions weigh 1)."""
        return {"content": 1.0, "style": 1.0, "sim": self.lambda_sim, "prior": self.lambda_prior,
                "cycle": self.lambda_cycle, "rev": self.lambda_rev}  # fmt: skip

    def problem_weights(self, role: str, score: float) -> dict[str, Any]:
        """The keyword weights of :func:`lora_merge.masks.build_problem` for a layer of ``role``."""
        return {"lambda_sim": self.lambda_sim, "lambda_prior": self.lambda_prior,
                "lambda_hinge": self.lambda_hinge, "lambda_cycle": self.lambda_cycle,
                "role": role, "prior_score": score}  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """JSON-ready settings (the report's ``config``)."""
        pri = self.priors
        return {"axis": self.axis, "steps": int(self.steps), "lr": float(self.lr), "lambda_sim": self.lambda_sim,
                "lambda_prior": self.lambda_prior, "lambda_hinge": self.lambda_hinge,
                "lambda_cycle": self.lambda_cycle, "lambda_rev": self.lambda_rev,
                "priors": pri if pri is None or isinstance(pri, str) else getattr(pri, "source", "table"),
                "prior_init": self.prior_init, "closed_form": self.closed_form}  # fmt: skip


@dataclass(frozen=True)
class SolveOptions:
    """How to run a solver (not what it minimizes): the device, the merge seed, whether a base model may be
    unpickled, progress output, and the model solver's own settings (the base model, mixed precision and
    the images per step)."""

    device: torch.device
    seed: int
    base: str | None
    mixed_precision: str
    batch_size: int
    allow_pickle: bool = False
    progress: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any], *, device: Any, seed: int, allow_pickle: bool = False,
                    progress: bool = True) -> SolveOptions:
        """From a strategy's configuration (``base``, ``mixed_precision``, ``batch_size``)."""
        return cls(device=torch.device(device), seed=int(seed), base=config.get("base"),
                   mixed_precision=str(config["mixed_precision"]), batch_size=int(config["batch_size"]),
                   allow_pickle=bool(allow_pickle), progress=progress)  # fmt: skip


@dataclass
class LayerMasks:
    """One layer's masks (fp32, CPU).  ``solution`` is the weight-space :class:`~lora_merge.masks.Solution`
    with its loss terms (None for masks learned through a model); ``key`` identifies the inputs they were
    solved for; ``info`` goes into the layer's report."""

    content: torch.Tensor | None
    style: torch.Tensor | None
    info: dict[str, Any] = field(default_factory=dict)
    solution: Any = None
    key: tuple | None = None


@dataclass
class MaskSolution:
    """A solver's answer: the masks of the layers it solved, the layers it could not reach (the strategy
    solves those in weight space), and the solver's own report (None for the weight-space solver)."""

    layers: dict[str, LayerMasks]
    skipped: list[str] = field(default_factory=list)
    details: Any = None  # e.g. the model solver's TrainResult (``report()``, ``num_trainable``)
    solver: str = "weights"
    priors_source: str | None = None  # where the layer priors came from (None: no priors)


class MaskSolver(Protocol):
    """A mask solver (``--mode NAME``)."""

    name: str

    def solve(self, objective: MaskObjective, plan: Any, references: References | None,
              options: SolveOptions) -> MaskSolution:  # fmt: skip
        ...


def check_references(references: References | None, what: str) -> References:
    """``references`` or a usage error naming what needs them."""
    if references is None:
        raise UsageError(f"{what} needs --content-images/--content-prompt/--style-images/--style-prompt")
    references.check_prompts(what)
    return references

