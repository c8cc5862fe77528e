"""The merge engine on in-memory adapters: strength semantics, plan, weights, rank, metadata, outputs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule
from lora_merge.engine import parse_layer_weight
from lora_merge.errors import MergeError, MissingModuleWarning, OutputExistsError, UsageError
from lora_merge.patterns import matches
from lora_merge.strategies import LayerResult, MergeStrategy

Q = "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"
K = "unet.up_blocks.0.attentions.10.transformer_blocks.0.attn2.to_k"
C = "unet.up_blocks.0.resnets.0.conv1"


def make(seed, r, alpha=None, names=(Q, K, C), dtype=torch.float32, d_out=24, d_in=20, c_in=6, rslora=False):
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="diffusers")
    for n in names:
        if n.endswith("conv1"):
            down = torch.randn(r, c_in, 3, 3, generator=g)
            up = torch.randn(d_out, r, 1, 1, generator=g)
        else:
            down, up = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        ad.modules[n] = LoraModule.from_tensors(
            n, down.to(dtype), up.to(dtype), alpha, "rslora" if rslora else "standard"
        )
    return ad


def dense(m: LoraModule) -> torch.Tensor:
    """Independent reference: s · B @ A from the raw tensors, in fp64."""
    r = m.down.shape[0]
    a = m.down.tensor.double().reshape(r, -1)
    b = m.up.tensor.double().reshape(m.up.shape[0], r)
    alpha = r if m.alpha is None else m.alpha
    s = alpha / r**0.5 if m.scale_rule == "rslora" else alpha / r
    return s * b @ a


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def quiet_merge(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingModuleWarning)
        return lm.merge(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_is_exact_weighted_sum(dtype):
    a = make(1, 4, alpha=1.5, dtype=dtype)  # alpha != r
    b = make(2, 8, alpha=16.0, dtype=dtype)  # mixed ranks, scale 2
    c = make(3, 2, alpha=3.0, dtype=dtype, rslora=True)
    w = [0.7, -0.45, 1.3]  # a negative weight
    res = lm.merge([a, b, c], weights=w)
    for name in (Q, K, C):
        ref = sum(wi * dense(x[name]) for wi, x in zip(w, (a, b, c)))
        out = res.adapter[name]
        assert out.dtype == torch.float32 and out.alpha == out.rank == 14  # alpha = rank: scale 1
        assert rel(out.delta(torch.float64), ref) < 1e-6
    assert tuple(res.adapter[C].down.shape) == (14, 6, 3, 3) and tuple(res.adapter[C].up.shape) == (
        24,
        14,
        1,
        1,
    )


def test_output_dtype_and_metadata():
    a, b = make(1, 4, alpha=2.0), make(2, 8)
    res = lm.merge([a, b], weights=[0.5, 0.5], dtype="fp16", seed=7)
    assert all(m.dtype == torch.float16 for m in res.adapter)
    md = res.adapter.metadata
    recipe = json.loads(md["lora_merge.recipe"])
    assert recipe["strategy"] == "linear" and recipe["weights"] == [0.5, 0.5] and recipe["seed"] == 7
    assert recipe["version"] == lm.__version__ and len(recipe["inputs"]) == 2
    assert md["ss_network_dim"] == md["ss_network_alpha"] == "12"
    assert "modelspec.merged_from" in md
    mixed = quiet_merge([make(1, 4, names=(Q,)), make(2, 8, names=(K,))])
    assert mixed.adapter.metadata["ss_network_dim"] == "Dynamic"  # kohya's word for per-module ranks


def test_missing_module_is_zero_update_with_warning():
    a = make(1, 4, names=(Q, K))
    b = make(2, 4, names=(Q, C))
    with pytest.warns(MissingModuleWarning, match="absent from input"):
        res = lm.merge([a, b], weights=[1.0, 2.0])
    assert list(res.adapter.modules) == [Q, K, C]
    assert rel(res.adapter[K].delta(torch.float64), dense(a[K])) < 1e-6
    assert rel(res.adapter[C].delta(torch.float64), 2 * dense(b[C])) < 1e-6


def test_shape_conflict_names_module_and_shapes():
    sd1 = make(1, 4, names=(K,), d_in=768)
    sdxl = make(2, 4, names=(K,), d_in=2048)
    with pytest.raises(MergeError, match=r"attn2\.to_k.*24×768.*24×2048"):
        lm.merge([sd1, sdxl], allow_mixed_arch=True)  # the architecture check comes first otherwise


def test_pattern_semantics():
    assert matches("up_blocks.0.attentions.1", Q)
    assert not matches("up_blocks.0.attentions.1", K)  # not a prefix of attentions.10
    assert matches("attn2", K) and not matches("attn", K)
    assert matches("up_blocks.0.*.to_q", Q) and matches("attentions.1?", K)
    assert matches("re:attentions\\.1\\d", K) and not matches("re:attentions\\.1\\d", Q)
    assert parse_layer_weight("up_blocks.0=0.5") == ("up_blocks.0", 0.5)
    assert parse_layer_weight("re:a=b=1,2") == ("re:a=b", [1.0, 2.0])
    with pytest.raises(UsageError):
        parse_layer_weight("nothing")


def test_layer_weights_multiply_matching_layers():
    a, b = make(1, 4), make(2, 4)
    res = lm.merge(
        [a, b],
        weights=[1.0, 1.0],
        layer_weights=[
            ("up_blocks.0.attentions.1", 0.0),
            ("attn2", [0.5, -1.0]),
            "conv1=2,3",
            ("up_blocks.0", 0.5),
        ],
    )
    torch.testing.assert_close(res.adapter[Q].delta(torch.float64), torch.zeros(24, 20, dtype=torch.float64))
    assert rel(res.adapter[K].delta(torch.float64), 0.25 * dense(a[K]) - 0.5 * dense(b[K])) < 1e-6
    assert rel(res.adapter[C].delta(torch.float64), 1.0 * dense(a[C]) + 1.5 * dense(b[C])) < 1e-6
    assert res.report["layers"][K]["weights"] == [0.25, -0.5]
    with pytest.raises(UsageError, match="3 value"):
        lm.merge([a, b], layer_weights=[("attn2", [1, 2, 3])])


def test_weights_validation():
    a, b = make(1, 4), make(2, 4)
    with pytest.raises(UsageError, match="1 weight"):
        lm.merge([a, b], weights=[1.0])
    with pytest.raises(UsageError, match="rank"):
        lm.merge([a, b], rank=0)
    with pytest.raises(UsageError, match="unknown strategy"):
        lm.merge([a, b], strategy="nope")
    with pytest.raises(UsageError, match="no parameter 'density'"):
        lm.merge([a, b], strategy="linear", params={"density": 0.5})
    with pytest.raises(UsageError, match="device"):
        lm.merge([a, b], device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            lm.merge([a, b], device="cuda")


def test_rank_k_is_best_rank_k_approximation():
    a, b = make(1, 6, alpha=3.0), make(2, 8)
    w = [0.8, -0.6]
    res = lm.merge([a, b], weights=w, rank=5)
    for name in (Q, K, C):
        exact = sum(wi * dense(x[name]) for wi, x in zip(w, (a, b)))
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)  # dense reference
        best = (u[:, :5] * s[:5]) @ vh[:5]
        got = res.adapter[name]
        assert got.rank == 5 and got.alpha == 5
        assert rel(got.delta(torch.float64), best) < 1e-5
        assert res.report["layers"][name]["refactored"]


def test_rank_above_exact_rank_keeps_exact():
    a, b = make(1, 2), make(2, 2)
    res = lm.merge([a, b], rank=64)
    assert all(m.rank == 4 for m in res.adapter)


class _Boom(MergeStrategy):
    name = "boom-test"
    description = "raises on the second layer"

    def merge_layer(self, inputs, ctx):
        if ctx.index == 1:
            raise RuntimeError("interrupted")
        return LayerResult(up=inputs[0].up, down=inputs[0].down)


def test_exception_mid_merge_leaves_no_output(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="interrupted"):
        lm.merge([make(1, 4), make(2, 4)], out, strategy=_Boom())
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_and_untouched(tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="force=True"):
        lm.merge([make(1, 4), make(2, 4)], out)
    assert out.read_bytes() == b"precious"


def test_never_writes_over_an_input_even_with_force(tmp_path):
    src = tmp_path / "a.safetensors"
    src.write_bytes(b"input")
    with pytest.raises(OutputExistsError, match="input"):
        lm.merge([src, make(2, 4)], src, force=True)
    assert src.read_bytes() == b"input"


def _with_head(ad, head):
    ad.extra_tensors["classifier.weight"] = lm.TensorRef.from_tensor(head)
    return ad


def test_extra_tensors_identical_kept_conflicting_refused():
    head = torch.randn(6, 20)
    same = lm.merge([_with_head(make(1, 4), head), _with_head(make(2, 4), head.clone())])
    torch.testing.assert_close(same.adapter.extra_tensors["classifier.weight"].load(), head)
    a, b = _with_head(make(1, 4), head), _with_head(make(2, 4), torch.randn(2, 20))
    with pytest.raises(
        MergeError, match=r"classifier\.weight \(6×20 in input 1 vs 2×20 in input 2.*keep_heads_from"
    ):
        lm.merge([a, b])
    kept = lm.merge([a, b], keep_heads_from=2)
    assert kept.adapter.extra_tensors["classifier.weight"].shape == (2, 20)
    with pytest.raises(UsageError):
        lm.merge([a, b], keep_heads_from=6)
    with pytest.warns(DeprecationWarning, match="keep_heads_from"):
        old = lm.merge([a, b], keep_extra_from=1)  # the old 0-based spelling
    assert old.adapter.extra_tensors["classifier.weight"].shape == (2, 20)


def test_report_written(tmp_path):
    rp = tmp_path / "report.json"
    res = lm.merge([make(1, 4), make(2, 4)], report_path=rp, strategy="ties", params={"density": 0.5})
    data = json.loads(rp.read_text())
    assert data["recipe"]["strategy"] == "ties" and data["recipe"]["params"]["density"] == 0.5
    assert set(data["layers"]) == {Q, K, C} and data["layers"][Q]["refactored"]
    assert res.report["recipe"] == data["recipe"]
    ret = data["layers"][Q]["retention"]  # two inputs: content (1) / style (2) retention per layer
    assert set(ret) == {"content", "style"} and all(0.0 <= v <= 1.5 for v in ret.values())
    three = lm.merge([make(1, 4), make(2, 4), make(3, 4)], report_path=tmp_path / "r3.json")
    assert "retention" not in three.report["layers"][Q]


def test_context_is_filled():
    seen = []

    class Spy(MergeStrategy):
        name = "spy-test"
        description = "records contexts"

        def prepare(self, plan):
            seen.append(("prepare", len(plan.adapters), plan.arch))

        def merge_layer(self, inputs, ctx):
            seen.append(
                (
                    ctx.name,
                    ctx.block,
                    ctx.resolution,
                    ctx.arch,
                    ctx.kind,
                    ctx.weight_shape,
                    ctx.seed,
                    [x.present for x in inputs],
                )
            )
            return LayerResult(up=inputs[0].up, down=inputs[0].down)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingModuleWarning)
        lm.merge([make(1, 4), make(2, 4, names=(Q,))], strategy=Spy(), arch="sdxl", seed=3)
    assert seen[0] == ("prepare", 2, "sdxl")
    assert seen[1] == (Q, "up_blocks.0.attentions.1", 32, "sdxl", "linear", (24, 20), 3, [True, True])
    assert (
        seen[3][0] == C
        and seen[3][4] == "conv"
        and seen[3][5] == (24, 6, 3, 3)
        and seen[3][7] == [True, False]
    )


def test_plan_answers_coefficients_and_contexts_once():
    """A strategy reads weights and contexts from the plan; it never computes a coefficient itself."""
    got = {}

    class Reader(MergeStrategy):
        name = "plan-reader-test"
        description = "reads the plan"

        def prepare(self, plan):
            for layer in plan.layers():
                got[layer.ctx.name] = (layer.coeffs, [x.coeff for x in plan.layer_inputs(layer)], layer.ctx.rank)

        def merge_layer(self, inputs, ctx):
            assert tuple(x.weight for x in inputs) == got[ctx.name][0]
            return LayerResult(up=inputs[0].up, down=inputs[0].down)

    a, b = make(1, 4), make(2, 4)
    lm.merge([a, b], strategy=Reader(), weights=[0.5, 2.0], layer_weights=[("up_blocks", [3.0, 1.0])], rank=2)
    assert got[Q][0] == (1.5, 2.0) and got[Q][2] == 2
    assert got[Q][1] == pytest.approx([1.5 * a[Q].scale, 2.0 * b[Q].scale])


def test_legacy_prepare_signature_still_works_with_a_deprecation_warning():
    """Third-party strategies written against prepare(inputs, context) keep working for now."""
    seen = []

    class Old(MergeStrategy):
        name = "old-prepare-test"
        description = "the pre-plan hook"

        def prepare(self, inputs, context):
            seen.append((len(inputs), context["arch"], context["weights"], context["plan"][:1], context["seed"]))

        def merge_layer(self, inputs, ctx):
            return LayerResult(up=inputs[0].up * inputs[0].coeff, down=inputs[0].down)

    with pytest.warns(DeprecationWarning, match=r"prepare\(plan\)"):
        res = lm.merge([make(1, 4), make(2, 4)], strategy=Old(), weights=[0.5, 1.0], arch="sdxl", seed=4)
    assert seen == [(2, "sdxl", [0.5, 1.0], [Q], 4)]
    torch.testing.assert_close(res.adapter[Q].delta(), 0.5 * make(1, 4)[Q].delta(), rtol=1e-5, atol=1e-6)


def test_progress_callback_sees_every_layer():
    calls = []
    lm.merge([make(1, 4), make(2, 4)], progress=lambda done, total, name: calls.append((done, total, name)))
    assert [c[0] for c in calls] == [1, 2, 3] and {c[1] for c in calls} == {3}


def test_progress_bar_runs():
    res = lm.merge([make(1, 4), make(2, 4)], progress=True)
    assert len(res.adapter) == 3
