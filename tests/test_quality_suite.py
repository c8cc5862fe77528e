"""The content–style suite: its LoRAs and judge, the metrics, tuned linear's seed discipline, the cache,
and a two-pair, small-n ``lora-merge bench quality`` end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from conftest import run_cli

from lora_merge import load
from lora_merge import toyworld as tw
from lora_merge.bench import suite as bs
from lora_merge.bench.metrics import bootstrap_ci, harmonic_mean, judge_metrics, paired_bootstrap_ci
from lora_merge.errors import UsageError
from lora_merge.toyworld.suite import QUICK, SUITE, pairs, style_check_prompts, unbound_prompts
from lora_merge.toyworld.train import content_training_set, style_reference, style_training_set


def test_suite_is_three_subjects_by_three_styles_all_held_out():
    assert len(SUITE) == 9 and len({p.name for p in SUITE}) == 9
    assert {p.subject for p in SUITE} == set(tw.SUBJECTS) and {p.style for p in SUITE} == set(tw.STYLE_CONCEPTS)
    for p in SUITE:
        assert p.subject not in tw.SEEN_SHAPES and p.style not in tw.SEEN_STYLES
        assert p.joint_prompt == f"a {p.subject} object in {p.style} style"
        assert p.style_shape not in " ".join(style_check_prompts(p.style)).split()
    assert [p.name for p in pairs(",".join(QUICK))] == list(QUICK)
    with pytest.raises(UsageError, match="unknown pair"):
        pairs("sks+plaid")
    assert all(p.subject not in q for p in SUITE for q in unbound_prompts(p.subject))


def test_recipes_dreambooth_and_styledrop():
    imgs, caps = content_training_set("tqk")
    assert imgs.shape == (6, 3, 16, 16) and set(caps) == {"a tqk object"}
    ref, cap = style_reference("mrv")
    assert cap == "a square in mrv style"
    aug, caps = style_training_set("mrv", 8)
    assert aug.shape == (8, 3, 16, 16) and set(caps) == {cap}
    # every augmentation is the one reference image shifted by ≤ 1 px and brightened by ≤ 5 %
    shifted = [torch.roll(ref, (dy, dx), (1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    for a in aug:
        assert min(float((a - t).abs().mean()) for t in shifted) < 0.06


def test_suite_loras_load_and_sample():
    world = tw.load_base()
    for p in SUITE[:: 4]:
        for path in p.paths():
            ad = load(path)
            assert ad.dialect == "diffusers" and len(ad) == 56 and set(ad.ranks) == {8}
        imgs = tw.sample(world, p.joint_prompt, seeds=[0, 1], steps=3, adapter=p.paths()[1])
        assert imgs.shape == (2, 3, 16, 16) and torch.isfinite(imgs).all()


def test_bootstrap_interval_of_a_known_sample():
    x = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(x, resamples=4000, seed=1)
    se = math.sqrt(0.3 * 0.7 / 100)
    assert lo < 0.3 < hi
    assert abs(lo - (0.3 - 1.96 * se)) < 0.025 and abs(hi - (0.3 + 1.96 * se)) < 0.025
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    lo2, hi2 = paired_bootstrap_ci([[1.0] * 10, [0.0] * 10])
    assert lo2 == hi2 == 0.5
    assert harmonic_mean(0.5, 0.5) == 0.5 and harmonic_mean(0.0, 1.0) == 0.0


def test_metrics_are_deterministic_and_sensible():
    judge = tw.load_judge()
    refs_c = content_training_set("sks")[0]
    ref_s = style_reference("zkz")[0][None]
    good = tw.render_batch(["sks"] * 8, ["zkz"] * 8, list(range(8)))
    bad = tw.render_batch(["circle"] * 8, ["solid"] * 8, list(range(8)))
    m = judge_metrics(good, judge, "sks", "zkz", refs_c, ref_s)
    assert m["joint_acc"] == 1.0 and m["joint_ci"] == [1.0, 1.0]
    assert m == judge_metrics(good, judge, "sks", "zkz", refs_c, ref_s)
    b = judge_metrics(bad, judge, "sks", "zkz", refs_c, ref_s)
    assert b["joint_acc"] == 0.0
    assert m["subject_sim"] > b["subject_sim"] and m["style_sim"] > b["style_sim"]
    assert m["hmean_sim"] > b["hmean_sim"]


def test_rendering_and_sampling_are_deterministic_for_a_seed():
    world = tw.load_base()
    a = tw.sample(world, "a tqk object in mrv style", seeds=[5, 6], steps=3, adapter=SUITE[-1].paths()[0])
    b = tw.sample(world, "a tqk object in mrv style", seeds=[5, 6], steps=3, adapter=SUITE[-1].paths()[0])
    assert torch.equal(a, b)
    assert torch.equal(tw.render("ohwx", "bfk", 3), tw.render("ohwx", "bfk", 3))


def test_tuned_linear_never_selects_on_test_seeds(monkeypatch):
    seen: list[list[int]] = []

    class FakeRunner(bs.Runner):
        def __init__(self):  # no model: the scoring function is replaced
            self.s = bs.SuiteSettings(n=4, val_n=3, grid=(0.5, 1.0))
            self.cache = bs.RowCache(None)
            self.progress = lambda m: None
            self.images = {}
            self._lora_sha = {}
            self.w = bs.World(None, None, "x")

        def judge_prompts(self, prompts, seeds, adapter, **kw):
            seen.append(list(seeds))
            joint = 1.0 if len(seen) == 3 else 0.0  # the third grid point wins
            return {"joint_acc": joint, "content_acc": joint, "style_acc": joint, "hmean_sim": 0.0,
                    "per_image": {"joint_acc": [joint]}}, torch.zeros(1, 3, 16, 16)

    r = FakeRunner()
    row = r.tuned_linear(SUITE[0])
    val, test = set(bs.validation_seeds(3)), set(bs.eval_seeds(4))
    assert not val & test
    assert all(set(s) == val for s in seen[:4])  # the 2 × 2 grid: validation only
    assert set(seen[4]) == test  # the chosen weights, scored once on the test seeds
    assert row["tuned_weights"] == [1.0, 0.5] and row["label"] == "tuned linear"
    assert len(seen) == 5


def test_row_cache_resumes_and_ignores_torn_files(tmp_path):
    c = bs.RowCache(tmp_path)
    assert c.get("k") is None
    c.put("k", {"a": 1})
    assert bs.RowCache(tmp_path).get("k") == {"a": 1}
    (tmp_path / "torn.json").write_text("{")
    assert c.get("torn") is None


def test_bench_quality_two_pairs_small_n_end_to_end(tmp_path, capsys):
    out = tmp_path / "docs"
    cache = tmp_path / "cache"
    args = ["bench", "quality", "--pairs", "sks+zkz,tqk+mrv", "--n", "4", "--val-n", "2", "--strategies",
            "linear,np-lora", "--no-ablations", "--no-model-mode", "--out", str(out), "--cache", str(cache),
            "--json"]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert [p["name"] for p in doc["pairs"]] == ["sks+zkz", "tqk+mrv"]
    for p in doc["pairs"]:
        assert 0.0 <= p["ceiling"] <= 1.0
        labels = [row["label"] for row in p["rows"]]
        assert labels[:5] == ["content LoRA alone", "style LoRA alone", "linear (1, 1)", "linear (0.5, 0.5)",
                              "tuned linear"]
        assert "np-lora" in labels
        for row in p["rows"]:
            for key in ("label", "strategy", "mode", "content_acc", "style_acc", "joint_acc", "joint_ci",
                        "subject_sim", "style_sim", "n"):
                assert key in row, key
            assert row["n"] == 4 and row["joint_ci"][0] <= row["joint_acc"] <= row["joint_ci"][1]
    assert {m["label"] for m in doc["mean"]} >= {"linear (1, 1)", "tuned linear", "np-lora"}
    for m in doc["mean"]:
        assert {"label", "strategy", "joint_acc", "joint_ci", "ceiling"} <= set(m)
    assert len(doc["loras"]) == 4 and all(len(lo["curve"]) == len(bs.STRENGTHS) for lo in doc["loras"])
    for f in ("quality-results.md", "quality-results.json", "images/quality-mean-joint.png",
              "images/quality-similarity.png", "images/quality/sks+zkz.png", "images/quality/tqk+mrv.png"):
        assert (out / f).is_file(), f
    assert json.loads((out / "quality-results.json").read_text())["pairs"] == doc["pairs"]
    # no overwrite without --force; with --force the cache answers every row
    code, _, stderr = run_cli(args, capsys)
    assert code != 0 and "exists" in stderr
    code, stdout, stderr = run_cli([*args, "--force"], capsys)
    assert code == 0, stderr
    doc3 = json.loads(stdout)
    assert doc3["cache"]["computed"] == 0 and doc3["cache"]["hits"] > 0
    assert doc3["pairs"] == doc["pairs"]
