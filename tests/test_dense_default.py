"""Dense strategies (ties, dare, magnitude-prune) never silently write full-rank files: by default each
layer is re-factored to the sum of the input ranks and the relative error is reported;
--full-rank keeps every direction, --rank K chooses."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule
from lora_merge.engine.run import DenseRefactorWarning
from lora_merge.errors import UsageError

NAMES = ("unet.down_blocks.1.attentions.0.proj_in", "unet.up_blocks.1.attentions.0.proj_out")


def make(seed, r=3, d=40):
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="kohya")
    for n in NAMES:
        ad.modules[n] = LoraModule.from_tensors(n, torch.randn(r, d, generator=g), torch.randn(d, r, generator=g))
    return ad


def dense_of(res, n):
    m = res.adapter[n]
    return m.delta().double()


@pytest.mark.parametrize("strategy,params", [("ties", {"density": 0.3}), ("dare", {"density": 0.5}),
                                             ("magnitude-prune", {"density": 0.3})])
def test_default_is_sum_of_ranks_with_reported_error(strategy, params):
    a, b = make(1), make(2, r=4)
    with pytest.warns(DenseRefactorWarning, match=r"sum of the inputs' ranks \(rank 7\).*relative error"):
        res = lm.merge([a, b], strategy=strategy, params=params)
    full = lm.merge([a, b], strategy=strategy, params=params, full_rank=True)
    dense = res.report["dense"]
    assert dense["rank_rule"] == "sum" and dense["rank_max"] == 7 and dense["modules"] == 2
    errs = []
    for n in NAMES:
        assert res.adapter[n].rank == 7  # not 40
        exact = dense_of(full, n)
        err = float((dense_of(res, n) - exact).norm() / exact.norm())
        assert err == pytest.approx(res.report["layers"][n]["dense_rel_error"], rel=1e-3, abs=1e-6)
        errs.append(err)
    assert dense["rel_error_max"] == pytest.approx(max(errs), rel=1e-3)
    assert full.report["dense"]["rank_rule"] == "full" and full.adapter[NAMES[0]].rank > 7
    assert full.report["recipe"]["full_rank"] is True and "full_rank" not in res.report["recipe"]


def test_full_rank_is_exact_to_fp32():
    a, b = make(1), make(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = lm.merge([a, b], strategy="magnitude-prune", params={"density": 0.3}, full_rank=True)
    assert res.report["dense"]["rel_error_max"] < 1e-6
    total = {n: a[n].delta().double() + b[n].delta().double() for n in NAMES}
    for n in NAMES:
        t = total[n]
        k = int(0.3 * t.numel())
        keep = torch.zeros(t.numel(), dtype=torch.bool)
        keep[t.abs().flatten().topk(k).indices] = True
        ref = t * keep.view_as(t)
        assert float((dense_of(res, n) - ref).norm() / ref.norm()) < 1e-5


def test_rank_reports_error_and_excludes_full_rank():
    a, b = make(1), make(2)
    with warnings.catch_warnings(record=True) as caught:  # an explicit --rank says what it lost, once
        warnings.simplefilter("always")
        res = lm.merge([a, b], strategy="ties", rank=2)
    lost = [str(w.message) for w in caught if issubclass(w.category, DenseRefactorWarning)]
    assert len(lost) == 1 and "ties: --rank 2 lost part of ΔW" in lost[0] and "--full-rank" not in lost[0]
    assert res.report["dense"]["rank_rule"] == "rank" and res.report["dense"]["rank_max"] == 2
    assert 0 < res.report["dense"]["rel_error_overall"] < 1
    with pytest.raises(UsageError, match="full_rank=True"):
        lm.merge([a, b], strategy="ties", rank=2, full_rank=True)


def test_cli_reports_rank_and_error(tmp_path, capsys):
    from lora_merge.cli import main

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lm.save(make(1), a)
    lm.save(make(2), b)
    out = tmp_path / "o.safetensors"
    with pytest.raises(SystemExit) as exc, pytest.warns(DenseRefactorWarning, match="--full-rank"):
        main(["merge", str(a), str(b), "-o", str(out), "-s", "ties", "--json"])
    cap = capsys.readouterr()
    assert exc.value.code == 0
    info = json.loads(cap.out)
    assert info["rank_max"] == 6 and info["dense"]["rank_rule"] == "sum"
    assert out.stat().st_size < 3 * a.stat().st_size


def test_truncated_dense_refactor_is_optimal_deterministic_and_reports_its_real_error():
    """The dense strategies' default rank goes through seeded subspace iteration (no full SVD): the same
    bytes every time, the error of a full SVD's top k to 1e-6 when the spectrum has a gap, and the
    reported error is the measured residual."""
    from lora_merge import linalg

    g = torch.Generator().manual_seed(0)
    for m, n in ((320, 320), (1280, 640), (640, 1280)):
        d = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) * 0.1 + 0.002 * torch.randn(m, n, generator=g)
        up, down, err, norm = linalg.refactor_dense_error(d, 8)
        up2, down2, _, _ = linalg.refactor_dense_error(d, 8)
        assert torch.equal(up, up2) and torch.equal(down, down2)
        s = torch.linalg.svdvals(d.double())
        optimal = float((s[8:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
        actual = float((d.double() - up.double() @ down.double()).norm() / d.double().norm())
        assert abs(actual - optimal) < 1e-6 and abs(err - actual) < 1e-6
        assert abs(norm - float(d.double().norm())) < 1e-6 * norm
