"""The Recipe object: from a file, from a merged file's metadata, with overrides, to the metadata; and a
merge replayed from a file written by an earlier version of lora-merge gives the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lora_merge as lm
from lora_merge.engine import RECIPE_KEYS, MergeOptions, Recipe, read_recipe_file, run_merge
from lora_merge.errors import MergeError, UsageError

REPLAY = Path(__file__).parent / "data" / "replay"


@pytest.mark.parametrize("name", ["linear_rank4", "ties", "ziplora"])
def test_replay_from_old_metadata_gives_the_same_bytes(tmp_path, monkeypatch, name):
    """Files in tests/data/replay were merged by lora-merge 0.1.0 before the engine was split (inputs
    given by relative path); replaying their recorded recipe reproduces them (up to the CPU's rounding)."""
    for f in ("in1.safetensors", "in2.safetensors"):
        shutil.copy(REPLAY / f, tmp_path / f)
    monkeypatch.chdir(tmp_path)
    old = REPLAY / f"{name}.safetensors"
    recipe = Recipe.from_metadata(old).with_overrides(output=f"{name}.safetensors")
    assert recipe.sha256 and all(recipe.sha256)  # the recorded hashes are checked against the copies
    run_merge(recipe, MergeOptions(threads=1))
    new = tmp_path / f"{name}.safetensors"
    # The solvers run in LAPACK/BLAS (truncated SVDs, the masks' float64 closed form), whose kernels round
    # differently on other CPUs (seen: factors 1e-5 apart, fp16 entries one ulp apart).  So the check is:
    # the same keys and metadata, every non-factor tensor identical, and every module's dense ΔW = up·down
    # equal to the recorded one up to fp16 rounding.
    from safetensors import safe_open

    with safe_open(str(old), "pt") as a, safe_open(str(new), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in (k for k in a.keys() if k.endswith(".lora_up.weight")):  # noqa: SIM118
            d = k[: -len(".lora_up.weight")] + ".lora_down.weight"
            want = a.get_tensor(k).double() @ a.get_tensor(d).double()
            got = b.get_tensor(k).double() @ b.get_tensor(d).double()
            torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))
        for k in (k for k in a.keys() if not k.endswith("weight")):  # noqa: SIM118
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
        ma, mb = a.metadata(), b.metadata()
    if name != "ziplora":
        assert ma == mb
        return
    # ziplora gained --strength after 0.1.0: the recipe replays with strength "free" (what the old file
    # did); the recorded recipe now names that parameter too
    assert {k for k in ma if ma[k] != mb.get(k)} == {"lora_merge.recipe"}
    ra, rb = json.loads(ma["lora_merge.recipe"]), json.loads(mb["lora_merge.recipe"])
    assert rb["params"] == {**ra["params"], "strength": "free"}


def test_replay_refuses_changed_inputs(tmp_path, monkeypatch):
    shutil.copy(REPLAY / "in1.safetensors", tmp_path / "in1.safetensors")
    shutil.copy(REPLAY / "in1.safetensors", tmp_path / "in2.safetensors")  # not the recorded file
    monkeypatch.chdir(tmp_path)
    recipe = Recipe.from_metadata(REPLAY / "ties.safetensors")
    with pytest.raises(MergeError, match="does not match the recipe"):
        run_merge(recipe)


def test_recipe_file_round_trip(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(
        "inputs: [a.safetensors, {path: sub/b.safetensors, sha256: abc}]\n"
        "strategy: ties\ndensity: 0.4\nweights: '0.7,0.3'\nlayer_weights: {up_blocks: 0.5}\n"
        "rank: 8\ndtype: fp16\nkeep-heads-from: 2\ndevice: cpu\nthreads: 2\noutput: out.safetensors\n"
    )
    data = read_recipe_file(f)
    r = Recipe.from_dict(data, f)
    assert r.inputs == (str(tmp_path / "a.safetensors"), str(tmp_path / "sub/b.safetensors"))
    assert r.sha256 == (None, "abc")
    assert r.params == {"density": 0.4} and r.weights == (0.7, 0.3) and r.layer_weights == (("up_blocks", 0.5),)
    assert (r.rank, r.dtype, r.keep_heads_from, r.output) == (8, "fp16", 2, str(tmp_path / "out.safetensors"))
    assert MergeOptions.from_dict(data) == MergeOptions(device="cpu", threads=2)
    o = r.with_overrides(params={"sign": "total"}, layer_weights=["mid_block=0"], rank=None, seed=5)
    assert o.params == {"density": 0.4, "sign": "total"} and o.rank == 8 and o.seed == 5
    assert o.layer_weights == (("up_blocks", 0.5), ("mid_block", 0.0))
    md = o.to_metadata(["a", "b"], ["h1", "h2"], ["kohya", "peft"], {"density": 0.4}, "sdxl", "kohya", "0")
    assert md["weights"] == [0.7, 0.3] and md["layer_weights"] == [["up_blocks", [0.5, 0.5]], ["mid_block", [0.0, 0.0]]]
    assert set(md) <= set(RECIPE_KEYS) | {"params"}
    back = Recipe.from_dict(md)
    assert back.inputs == ("a", "b") and back.sha256 == ("h1", "h2") and back.keep_heads_from == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nonsense: 1\n", "unknown recipe key"),
        ("inputs: a.safetensors\n", "'inputs' must be a list"),
        ("params: [1]\n", "'params' must be a mapping"),
        ("rank: 2.5\n", "'rank' must be an integer"),
        ("weights: [a, b]\n", "'weights' must be numbers"),
        ("layer_weights: [[x]]\n", "bad layer weight"),
    ],
)
def test_bad_recipe_files_are_usage_errors(tmp_path, text, message):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(UsageError, match=message):
        Recipe.from_dict(read_recipe_file(f), f)


def test_validate_checks_counts_before_any_work():
    r = Recipe(inputs=("a", "b"), weights=(1.0,))
    with pytest.raises(UsageError, match="1 weight"):
        r.validate()
    with pytest.raises(UsageError, match="only 2 inputs"):
        Recipe(inputs=("a", "b"), keep_heads_from=3).validate()
    with pytest.raises(UsageError, match="takes 2 input"):
        Recipe(inputs=("a",), strategy="ziplora").validate()
    with pytest.raises(UsageError, match="threads="):
        MergeOptions(threads=0)


def test_metadata_recipe_is_a_recipe(tmp_path):
    res = lm.merge([REPLAY / "in1.safetensors", REPLAY / "in2.safetensors"], tmp_path / "m.safetensors",
                   weights=[0.5, 1.0], rank=3)
    rec = json.loads(lm.load(tmp_path / "m.safetensors").metadata["lora_merge.recipe"])
    assert rec == res.report["recipe"]
    again = Recipe.from_metadata(tmp_path / "m.safetensors")
    assert again.weights == (0.5, 1.0) and again.rank == 3 and again.params == {}
