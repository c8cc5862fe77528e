"""A third-party mask strategy — a ``PairMaskStrategy`` subclass written here, with its own parameters and
objective — runs through both solvers (``--mode weights`` and ``--mode model``) with no change to the
package: the solvers see only its :class:`~lora_merge.masks.MaskObjective`."""

from __future__ import annotations

import pytest
import torch

import lora_merge
from lora_merge import masks as M
from lora_merge.masks import MaskObjective
from lora_merge.strategies.base import Param
from lora_merge.strategies.mask_solvers import SOLVERS, get_solver, register_solver
from lora_merge.strategies.pair_masks import (
    INPUT_PARAMS,
    REFINE_PARAMS,
    STRENGTH_PARAM,
    ZIPLORA_MODEL_PARAMS,
    PairMaskStrategy,
)
from lora_merge.toyworld import bundled_loras


class InputColumnMasks(PairMaskStrategy):
    """Masks over input columns with a strong similarity penalty and a Constyle term (a combination no
    built-in strategy declares)."""

    name = "third-party-columns"
    description = "input-column masks, strong similarity penalty, weight-space Constyle"
    params = (
        Param("separation", float, 0.5, "weight of the similarity term", range=(0.0, None)),
        Param("additivity", float, 0.05, "weight of the Constyle term", range=(0.0, None)),
        Param("closed_form", bool, True, "start from the closed form"),
        STRENGTH_PARAM,
        *REFINE_PARAMS,
        *INPUT_PARAMS,
        *ZIPLORA_MODEL_PARAMS,
    )

    def mask_objective(self, plan=None) -> MaskObjective:
        cfg = self.config
        return MaskObjective(axis="in", lambda_sim=cfg["separation"], lambda_cycle=cfg["additivity"],
                             **self.refine_settings())  # fmt: skip


@pytest.fixture(scope="module")
def pair():
    files = bundled_loras()
    return [lora_merge.load(files["content"]), lora_merge.load(files["style"])]


def test_a_plugin_mask_strategy_solves_in_weight_space(pair):
    strat = InputColumnMasks(steps=5, separation=0.5, strength="free")
    res = lora_merge.merge(pair, strategy=strat)
    name = next(iter(res.adapter.modules))
    # the same layer solved directly with the objective's settings: the strategy added nothing of its own
    obj = strat.mask_objective()
    assert (obj.axis, obj.lambda_sim, obj.lambda_cycle, obj.steps) == ("in", 0.5, 0.05, 5)
    masks = strat.sidecars()["masks"]
    mc, ms = masks[f"{name}.mask_content"], masks[f"{name}.mask_style"]
    d_in = pair[0].modules[name].factors()[1].shape[1]
    assert mc.shape == ms.shape == (d_in,)
    assert strat.report()["layers"] == len(res.adapter.modules)
    # more separation weight → more separated masks (mean |m_c · m_s| falls)
    loose = InputColumnMasks(steps=5, separation=0.0, strength="free")
    lora_merge.merge(pair, strategy=loose)
    tight_sim = sum(M.similarity(masks[f"{n}.mask_content"].numpy(), masks[f"{n}.mask_style"].numpy())
                    for n in res.adapter.modules)  # fmt: skip
    lm = loose.sidecars()["masks"]
    loose_sim = sum(M.similarity(lm[f"{n}.mask_content"].numpy(), lm[f"{n}.mask_style"].numpy())
                    for n in res.adapter.modules)  # fmt: skip
    assert tight_sim < loose_sim


def test_a_plugin_mask_strategy_trains_through_the_model(pair):
    strat = InputColumnMasks(mode="model", base="toyworld", content_images="toyworld:content",
                             content_prompt="a ohwx object", style_images="toyworld:mrv", style_prompt="mrv style",
                             steps=2, strength="free")  # fmt: skip
    res = lora_merge.merge(pair, strategy=strat)
    rep = strat.report()
    assert rep["mode"] == "model"
    trained = rep["model_mode"]
    assert trained["steps"] == 2 and {"content", "style", "sim", "cycle"} <= set(trained["loss_curve"][0])
    assert "prior" not in trained["loss_curve"][0]  # the objective has no prior term
    assert trained["config"]["axis"] == "in" and trained["config"]["lambda_sim"] == 0.5
    # every layer got input-column masks, trained (not all ones)
    masks = strat.sidecars()["masks"]
    name = next(iter(res.adapter.modules))
    d_in = pair[0].modules[name].factors()[1].shape[1]
    assert masks[f"{name}.mask_content"].shape == (d_in,)
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in masks.values())


def test_a_plugin_solver_is_picked_by_mode(pair, monkeypatch):
    """``register_solver`` adds a ``--mode``; it receives the objective and the options."""
    seen = {}

    class OnesSolver:
        name = "ones"

        def solve(self, objective, plan, references, options):
            seen.update(objective=objective, seed=options.seed)
            layers = {}
            for layer in plan.layers():
                c, s = plan.layer_inputs(layer)
                layers[layer.ctx.name] = M.LayerMasks(torch.ones(c.down.shape[1]), torch.ones(s.down.shape[1]))
            return M.MaskSolution(layers=layers, solver=self.name)

    import sys
    import types

    mod = types.ModuleType("third_party_solver")
    mod.OnesSolver = OnesSolver
    monkeypatch.setitem(sys.modules, "third_party_solver", mod)
    monkeypatch.setitem(SOLVERS, "ones", "third_party_solver:OnesSolver")
    assert isinstance(get_solver("ones"), OnesSolver)
    strat = InputColumnMasks(strength="free")
    strat.config["mode"] = "ones"  # a choice the declaration did not know: set as a recipe replay would
    res = lora_merge.merge(pair, strategy=strat, seed=7)
    assert seen["objective"].axis == "in" and seen["seed"] == 7
    name = next(iter(res.adapter.modules))
    want = pair[0].modules[name].delta() + pair[1].modules[name].delta()  # all-ones masks: the direct sum
    torch.testing.assert_close(res.adapter.modules[name].delta(), want, rtol=1e-5, atol=1e-6)
    register_solver("ones", "third_party_solver:OnesSolver")  # the public spelling of the same
    assert SOLVERS["ones"] == "third_party_solver:OnesSolver"
