"""The engine's direct path for exact ``linear`` merges and the mapped tensor reads (performance work).

Both must give exactly what the general path gives: the same bits for every dtype combination."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import lora_merge as lm
from lora_merge import Adapter, LoraModule, linalg
from lora_merge.strategies.linear import Linear


class _GeneralLinear(Linear):
    """Same strategy, but not the built-in class: the engine takes its general per-layer path."""


def _adapter(seed: int, dtype: torch.dtype, alpha: float, names=("a", "b", "c")) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i, n in enumerate(names):
        r = 3 + i
        if n == "conv":
            down, up = torch.randn(r, 8, 1, 1, generator=g), torch.randn(6, r, 1, 1, generator=g)
        else:
            down, up = torch.randn(r, 10 + i, generator=g), torch.randn(7, r, generator=g)
        mods[f"unet.{n}"] = LoraModule.from_tensors(f"unet.{n}", down.to(dtype), up.to(dtype), alpha=alpha)
    return Adapter(modules=mods, dialect="kohya")


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out", ["fp16", "bf16", "fp32"])
def test_exact_linear_fast_path_is_bit_identical(in_dtype, out):
    a = _adapter(1, in_dtype, 3.0, ("a", "b", "conv"))
    b = _adapter(2, in_dtype, 0.7, ("a", "conv", "d"))
    kw = {"weights": [0.8, -1.3], "layer_weights": ["unet.b=0.0"], "dtype": out}
    with pytest.warns(lm.errors.MissingModuleWarning):
        fast = lm.merge([a, b], **kw)
    with pytest.warns(lm.errors.MissingModuleWarning):
        slow = lm.merge([a, b], strategy=_GeneralLinear(), **kw)
    assert list(fast.adapter.modules) == list(slow.adapter.modules)
    for name, m in slow.adapter.modules.items():
        f = fast.adapter.modules[name]
        assert f.alpha == m.alpha and f.rank == m.rank
        for t_fast, t_slow in ((f.down.load(), m.down.load()), (f.up.load(), m.up.load())):
            assert t_fast.dtype == t_slow.dtype and t_fast.shape == t_slow.shape
            assert torch.equal(t_fast.view(-1), t_slow.view(-1)), name
        assert fast.report["layers"][name]["rank"] == slow.report["layers"][name]["rank"]


def test_mapped_reads_equal_safe_open(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "lora_unet_x_to_q.lora_down.weight": torch.randn(4, 9, generator=g).half(),
        "lora_unet_x_to_q.lora_up.weight": torch.randn(5, 4, generator=g).half(),
        "lora_unet_x_to_q.alpha": torch.tensor(2.0),
        "lora_unet_y_conv.lora_down.weight": torch.randn(2, 3, 1, 1, generator=g).to(torch.bfloat16),
        "lora_unet_y_conv.lora_up.weight": torch.randn(6, 2, 1, 1, generator=g).to(torch.bfloat16),
    }
    path = tmp_path / "l.safetensors"
    save_file(tensors, str(path))
    ad = lm.load(path)
    got = {r.key: r.load() for m in ad for r in (m.down, m.up)}
    for k, t in got.items():
        assert t.dtype == tensors[k].dtype and torch.equal(t, tensors[k])
        t.add_(1)  # private mapping: writes never reach the file
    assert all(torch.equal(lm.load(path)[m.name].down.load(), tensors[m.down.key]) for m in ad)
    # each tensor owns its storage (safetensors.save_file refuses tensors that share memory)
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == len(got)


def test_mapped_read_of_a_truncated_file_is_a_format_error(tmp_path):
    t = {"lora_unet_x_to_q.lora_down.weight": torch.ones(64, 64), "lora_unet_x_to_q.lora_up.weight": torch.ones(8, 64)}
    path = tmp_path / "l.safetensors"
    save_file(t, str(path))
    ad = lm.load(path)
    os.truncate(path, os.path.getsize(path) - 4096)
    with pytest.raises(lm.errors.FormatError, match="shorter"):
        ad["unet.x.to_q"].down.load()


@pytest.mark.parametrize("shape", [(50, 12, 40), (30, 6, 200)])
def test_gram_core_svd_matches_qr_route(shape):
    d_out, r, d_in = shape
    g = torch.Generator().manual_seed(3)
    up = torch.randn(d_out, r, generator=g) * torch.logspace(0, -2, r)
    down = torch.randn(r, d_in, generator=g)
    u, s, vh = linalg.core_svd(up, down)
    _, s2, _ = linalg._core_svd_qr(up, down)
    assert torch.allclose(s, s2, rtol=1e-5, atol=1e-6 * float(s2[0]))
    assert torch.allclose(u.T @ u, torch.eye(r), atol=1e-5) and torch.allclose(vh @ vh.T, torch.eye(r), atol=1e-5)
    assert torch.allclose((u * s) @ vh, up @ down, atol=1e-5 * float((up @ down).abs().max()))


def test_rank_deficient_core_svd_falls_back_to_qr():
    g = torch.Generator().manual_seed(4)
    b, a = torch.randn(20, 3, generator=g), torch.randn(3, 30, generator=g)
    up, down = torch.cat([b, b], 1), torch.cat([a, a], 0)  # rank 3 in a rank-6 factorization
    assert linalg._core_svd_gram(up.double(), down.double(), 6) is None
    u, s, vh = linalg.core_svd(up, down)
    assert s.shape == (6,) and float(s[3:].max()) < 1e-5 * float(s[0])
    assert torch.allclose((u * s) @ vh, up @ down, atol=1e-4)
