"""The layer fidelity metric (lora_merge.analysis.fidelity) against dense computations."""
from __future__ import annotations

import pytest
import torch

from lora_merge.adapter import Adapter, LoraModule
from lora_merge.analysis.fidelity import evaluate, retention
from lora_merge.input_models import IdentityModel, save_stats
from lora_merge.strategies import LayerInput


def _inputs(seed=0, d_out=10, d_in=14, rc=3, rs=2):
    g = torch.Generator().manual_seed(seed)
    c = LayerInput(torch.randn(d_out, rc, generator=g), torch.randn(rc, d_in, generator=g), 0.5, 0.7)
    s = LayerInput(torch.randn(d_out, rs, generator=g), torch.randn(rs, d_in, generator=g), 2.0, 1.0)
    return c, s


def _dense_retention(dm, dc, sigma):
    e = lambda x: float(torch.trace(x @ sigma @ x.T))
    return 1 - e(dm - dc) / e(dc)


def test_retention_equals_the_dense_formula_for_each_input_model(tmp_path):
    c, s = _inputs()
    g = torch.Generator().manual_seed(9)
    mu, md = torch.randn(10, 4, generator=g), torch.randn(4, 14, generator=g)
    dm = (mu @ md).double()
    dc, ds = c.unweighted_delta().double(), s.unweighted_delta().double()  # targets at strength 1
    pc = torch.linalg.pinv(c.down.double()) @ c.down.double()
    ps = torch.linalg.pinv(s.down.double()) @ s.down.double()
    r = retention(mu, md, c, s)
    assert r["content"] == pytest.approx(_dense_retention(dm, dc, pc), rel=1e-4)
    assert r["style"] == pytest.approx(_dense_retention(dm, ds, ps), rel=1e-4)
    r = retention(mu, md, c, s, "identity")
    eye = torch.eye(14, dtype=torch.float64)
    assert r["content"] == pytest.approx(_dense_retention(dm, dc, eye), rel=1e-4)
    assert retention(mu, md, c, s, IdentityModel()) == r
    x = torch.randn(40, 14, generator=g)
    sig_c, sig_s = x[:20].T @ x[:20] / 20, x[20:].T @ x[20:] / 20
    path = save_stats(tmp_path / "st.safetensors", {"unet.l": {"content": sig_c, "style": sig_s}})
    r = retention(mu, md, c, s, "stats", module="unet.l", stats=path)
    assert r["content"] == pytest.approx(_dense_retention(dm, dc, sig_c.double()), rel=1e-4)
    assert r["style"] == pytest.approx(_dense_retention(dm, ds, sig_s.double()), rel=1e-4)


def test_orthogonal_inputs_give_full_retention_for_the_direct_sum_and_weights_count():
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(16, 6, generator=g))[0].T
    c = LayerInput(torch.randn(8, 3, generator=g), q[:3], 1.0, 1.0)
    s = LayerInput(torch.randn(8, 3, generator=g), q[3:], 1.0, 1.0)
    up, down = torch.cat([c.up, s.up], 1), torch.cat([c.down, s.down])
    r = retention(up, down, c, s)
    assert r["content"] == pytest.approx(1.0, abs=1e-6) and r["style"] == pytest.approx(1.0, abs=1e-6)
    r = retention(up, 0.5 * down, c, s)  # the direct merge at (0.5, 0.5): 1 − 0.5²
    assert r["content"] == pytest.approx(0.75, abs=1e-6) and r["style"] == pytest.approx(0.75, abs=1e-6)
    # identity inputs see the other LoRA's update as an error
    r = retention(up, down, c, s, "identity")
    assert r["content"] < 1 and r["style"] < 1


def test_absent_lora_gives_none():
    c, _ = _inputs()
    absent = LayerInput(torch.zeros(10, 0), torch.zeros(0, 14), 0.0, 1.0, present=False)
    r = retention(c.up * c.scale, c.down, c, absent)
    assert r["style"] is None and r["content"] == pytest.approx(1.0, abs=1e-6)


def test_evaluate_adapters_reports_layers_and_joint_mean():
    c, s, m = Adapter(), Adapter(), Adapter()
    g = torch.Generator().manual_seed(2)
    for i in range(3):
        name = f"unet.up_blocks.1.attentions.{i}.transformer_blocks.0.attn1.to_q"
        a1, a2 = torch.randn(2, 12, generator=g), torch.randn(2, 12, generator=g)
        b1, b2 = torch.randn(9, 2, generator=g), torch.randn(9, 2, generator=g)
        c.modules[name] = LoraModule.from_tensors(name, a1, b1, alpha=1.0)
        s.modules[name] = LoraModule.from_tensors(name, a2, b2)
        w = 1.0 if i else 0.3
        m.modules[name] = LoraModule.from_tensors(name, torch.cat([0.5 * a1 * w, a2]), torch.cat([b1, b2], 1), alpha=4.0)
    only = "unet.up_blocks.1.attentions.9.transformer_blocks.0.attn1.to_q"
    c.modules[only] = LoraModule.from_tensors(only, torch.randn(2, 12, generator=g), torch.randn(9, 2, generator=g))
    res = evaluate(c, s, m)
    rows = {r["module"]: r for r in res["layers"]}
    assert rows[only]["style"] is None and rows[only]["joint"] is None and rows[only]["content"] == pytest.approx(0.0)
    both = [r for r in res["layers"] if r["joint"] is not None]
    assert res["mean"]["layers"] == 3 == len(both)
    assert res["mean"]["joint"] == pytest.approx(sum(min(r["content"], r["style"]) for r in both) / 3)
    assert res["layers"][0]["block"] == "unet.up_blocks.1.attentions.0"
