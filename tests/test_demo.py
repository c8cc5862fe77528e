"""``lora-merge demo`` end to end at a reduced N, and ``bench quality``'s variant discovery."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

from click.testing import CliRunner

from lora_merge.bench.variants import ABLATIONS, default_variants
from lora_merge.cli import cli
from lora_merge.strategies import available_strategies


def test_demo_writes_grid_and_judges(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    # ZipLoRA/DuoLoRA optimise per layer (tens of seconds): the suite runs the closed-form rows only
    r = CliRunner().invoke(cli, ["demo", "--n", "2", "--json", "--strategies", "linear"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    png = tmp_path / "lora-merge-demo.png"
    assert png.is_file() and doc["grid"] == "lora-merge-demo.png"
    labels = [row["label"] for row in doc["rows"]]
    assert labels == ["content LoRA alone", "style LoRA alone", "linear (1, 1)", "linear (0.5, 0.5)"]
    for row in doc["rows"]:
        assert row["n"] == 2
        assert row["content_acc"] is not None and 0 <= row["content_acc"] <= 1
    with Image.open(png) as im:
        assert im.size[1] >= len(labels) * 16 * 4
    # never overwrite without --force
    r2 = CliRunner().invoke(cli, ["demo", "--n", "1", "--strategies", "linear"])
    assert r2.exit_code != 0 and "exists" in str(r2.exception or r2.output)


def test_demo_default_strategies_follow_the_registry():
    from lora_merge.bench.variants import demo_variants

    labels = [v.label for v in demo_variants(None)]
    assert labels[:2] == ["linear (1, 1)", "linear (0.5, 0.5)"]
    for extra in ("ziplora", "duolora"):
        assert (extra in labels) == (extra in available_strategies())


def test_demo_rejects_unknown_strategy(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--n", "1", "--strategies", "nope", "--out", str(tmp_path / "x.png")])
    assert r.exit_code != 0
    assert "unknown strategy" in str(r.exception or r.output)


def test_bench_variants_cover_registry_and_ablations():
    avail = available_strategies()
    vs = default_variants()
    strategies = {v.strategy for v in vs}
    two_input = {n for n, c in avail.items() if c.min_inputs <= 2 and (c.max_inputs is None or c.max_inputs >= 2)}
    assert strategies == two_input
    labels = [v.label for v in vs]
    assert "linear (1, 1)" in labels and "linear (0.5, 0.5)" in labels
    for name, abl in ABLATIONS.items():
        if name in avail:
            declared = {p.name for p in avail[name].params}
            for suffix, params in abl:
                assert (f"{name} ({suffix})" in labels) == set(params).issubset(declared)
    assert all(v.params == {} for v in default_variants(ablations=False))
