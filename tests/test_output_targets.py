"""What an output path may be: a regular file or a missing path (a PEFT adapter: a folder) — never a
device, FIFO, socket or folder, ``--force`` or not, also behind a link; a trailing '/' on a file path is an
error; ``merge`` without ``-o`` says nothing was written only with ``--dry-run``; recipe files with a path
that is not a string or bytes that are not UTF-8 get one line; a rank truncation reports what it lost.
Every special file here is made in the test's own temporary folder."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import run_cli

from lora_merge.toyworld import bundled_loras


@pytest.fixture
def pair():
    files = bundled_loras()
    return str(files["content"]), str(files["style"])


def _specials(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = {"fifo": fifo, "folder": tmp_path / "folder"}
    out["folder"].mkdir()
    try:
        dev = tmp_path / "dev"
        os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a character device node of our own
        out["device"] = dev
        link = tmp_path / "link-to-device"
        link.symlink_to(dev)
        out["link to a device"] = link
    except PermissionError:  # not root: FIFO and folder only
        pass
    return out


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_special_files_are_never_replaced_even_with_force(tmp_path, capsys, pair, command):
    for what, target in _specials(tmp_path).items():
        before = os.lstat(target)
        argv = ["convert", pair[0], target, "--force"] if command == "convert" else \
            ["merge", *pair, "-o", target, "--force"]
        code, _, err = run_cli(argv, capsys)
        assert code != 0, what
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert str(target.name) in err, err
        after = os.lstat(target)
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode), what  # still what it was
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_a_trailing_slash_is_an_error_except_for_a_peft_folder(tmp_path, capsys, pair):
    for argv in (["convert", pair[0], f"{tmp_path}/out/"], ["merge", *pair, "-o", f"{tmp_path}/out/"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and "ends with '/'" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    code, _, err = run_cli(["convert", pair[0], f"{tmp_path}/peft/", "--to", "peft"], capsys)
    assert code == 0, err
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


def test_merge_without_output_needs_dry_run(tmp_path, capsys, pair, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["merge", *pair], capsys)
    assert code == 2 and "no output" in err and "--dry-run" in err
    code, out, err = run_cli(["merge", *pair, "--dry-run", "--json"], capsys)
    assert code == 0 and "nothing written" in err and '"output": null' in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, says", [
    (b"inputs: [{path: 3}, b.safetensors]\noutput: x.safetensors\n", "'path' must be a path (a string), got int 3"),
    (b"inputs: [a.safetensors, b.safetensors]\noutput: [1]\n", "'output' must be a path"),
    (b"inputs: [\xff\xfe]\n", "is UTF-8 text; byte 9 is not"),
])  # fmt: skip
def test_recipe_files_with_bad_values_get_one_line(tmp_path, capsys, text, says):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text)
    code, _, err = run_cli(["merge", "--config", recipe], capsys)
    assert code == 2 and says in err and "recipe.yaml" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_svd_rank_truncation_reports_and_warns(tmp_path, pair):
    import warnings

    import lora_merge

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lora_merge.merge(list(pair), strategy="svd", rank=2)
    msgs = [str(w.message) for w in caught if "lost part of ΔW" in str(w.message)]
    assert len(msgs) == 1 and "--rank 2" in msgs[0]
    trunc = res.report["truncation"]
    assert 0.01 < trunc["rel_error_max"] < 1 and trunc["modules"] == len(res.adapter.modules)
    # the reported error is the real one: ‖ΔW − BA‖/‖ΔW‖ of the worst module, from the dense sum
    name = trunc["worst_module"]
    a, b = (lora_merge.load(p) for p in pair)
    want = a.modules[name].delta() + b.modules[name].delta()
    got = res.adapter.modules[name].delta()
    assert abs(float((want - got).norm() / want.norm()) - trunc["rel_error_max"]) < 1e-4
    with warnings.catch_warnings(record=True) as caught:  # no truncation: no warning, no entry
        warnings.simplefilter("always")
        res = lora_merge.merge(list(pair), strategy="svd")
    assert not [w for w in caught if "lost part" in str(w.message)] and "truncation" not in res.report


# ------------------------------------------------------------------ errors that name the real cause
def _lokr_file(path, w1, w2):
    import torch
    from safetensors.torch import save_file

    n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{n}.lokr_w1": torch.full((4, 4), w1, dtype=torch.float64),
               f"{n}.lokr_w2": torch.full((80, 80), w2, dtype=torch.float64),
               f"{n}.alpha": torch.tensor(4.0, dtype=torch.float64)}, str(path))  # fmt: skip
    return path


@pytest.mark.parametrize("w1, w2, says", [
    (1e300, 1.0, "holds values up to 1e+300, beyond the range of float32"),  # finite in F64 only
    (1e20, 1e20, "its LoKr ΔW overflows float32"),  # finite factors, infinite product
])  # fmt: skip
def test_values_that_overflow_float32_name_the_file_and_the_tensor(tmp_path, capsys, w1, w2, says):
    src = _lokr_file(tmp_path / "lokr.safetensors", w1, w2)
    for argv in (["convert", src, tmp_path / "o.safetensors", "--rank", "4"],
                 ["merge", src, src, "-o", tmp_path / "o.safetensors", "--rank", "4"]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and says in err and "lokr.safetensors" in err, err
        assert len(err.strip().splitlines()) == 1 and "linalg" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lokr.safetensors"]


def test_dora_with_a_zero_norm_row_names_the_module_and_the_cause(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    a, b = torch.randn(2, 8), torch.randn(8, 2)
    w = -(b @ a)  # W + ΔW = 0 in every column
    save_file({"double_blocks.0.img_attn.proj.weight": w}, str(tmp_path / "base.safetensors"))
    key = "lora_unet_double_blocks_0_img_attn_proj"
    save_file({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(2.0),
               f"{key}.dora_scale": torch.rand(1, 8) + 0.5}, str(tmp_path / "dora.safetensors"))  # fmt: skip
    code, _, err = run_cli(["convert", tmp_path / "dora.safetensors", tmp_path / "o.safetensors", "--rank", "4",
                            "--base-weights", tmp_path / "base.safetensors"], capsys)  # fmt: skip
    assert code == 2 and "‖W + ΔW‖ is 0 in column 0" in err and "img_attn" in err and "dora.safetensors" in err, err
    assert "non-finite" not in err and not (tmp_path / "o.safetensors").exists()


def test_merging_read_only_dialect_inputs_writes_a_writable_dialect_and_says_so(tmp_path, capsys):
    """XLabs FLUX.1 files are read only: without --to the merge writes kohya (native FLUX.1 names) and
    says which; the merged ΔW is the sum."""
    import torch
    from safetensors.torch import save_file

    import lora_merge

    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(2):
        sd[f"double_blocks.{i}.processor.qkv_lora1.down.weight"] = torch.randn(2, 3072, generator=g)
        sd[f"double_blocks.{i}.processor.qkv_lora1.up.weight"] = torch.randn(9216, 2, generator=g) * 0.01
    src = tmp_path / "xlabs.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "m.safetensors"
    from lora_merge.cli import main

    with pytest.warns(UserWarning, match="xlabs dialect is read only: writing kohya .*--to picks another"), \
            pytest.raises(SystemExit) as exc:
        main(["merge", str(src), str(src), "-o", str(out)])
    assert exc.value.code == 0, capsys.readouterr().err
    merged, one = lora_merge.load(out), lora_merge.load(src)
    assert merged.dialect == "kohya"
    for name, m in one.modules.items():
        torch.testing.assert_close(merged.modules[name].delta(), 2 * m.delta(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["linear", "svd", "ties"])
def test_every_rank_truncation_reports_its_error_and_warns(pair, capsys, tmp_path, strategy):
    """``--rank K`` below the exact rank: the JSON summary holds the relative ΔW error (the same optimum
    for linear and svd) and a warning says what was lost."""
    import json

    import lora_merge

    out = tmp_path / "m.safetensors"
    from lora_merge.cli import main

    with pytest.warns(UserWarning, match=f"{strategy}: --rank 2 lost part of ΔW"), \
            pytest.raises(SystemExit) as exc:
        main(["merge", *pair, "-s", strategy, "--rank", "2", "-o", str(out), "--json"])
    assert exc.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    lost = summary.get("truncation") or summary.get("dense")
    assert lost["rank_rule"] in ("--rank 2", "rank") and 0.01 < lost["rel_error_max"] < 1
    if strategy in ("linear", "svd"):  # Eckart–Young: both keep the best rank-2 part of the same sum
        a, b = (lora_merge.load(p) for p in pair)
        name = lost["worst_module"]
        want = a.modules[name].delta() + b.modules[name].delta()
        got = lora_merge.load(out).modules[name].delta()
        assert abs(float((want - got).norm() / want.norm()) - lost["rel_error_max"]) < 1e-3


def _dit_file(path, kind):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd = {}
    if kind == "sd3":
        for n, rows in (("lora_unet_joint_blocks_0_x_block_attn_qkv", 48), ("lora_unet_joint_blocks_1_context_block_mlp_fc1", 64)):
            sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"] = torch.randn(2, 16, generator=g), torch.randn(rows, 2, generator=g)
            sd[f"{n}.alpha"] = torch.tensor(2.0)
    else:  # Z-Image, original (ComfyUI) names
        for n, rows in (("diffusion_model.layers.0.attention.qkv", 48), ("diffusion_model.layers.1.feed_forward.w1", 32)):
            sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = torch.randn(2, 16, generator=g), torch.randn(rows, 2, generator=g)
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("kind", ["sd3", "z-image"])
def test_a_forced_arch_of_every_family_is_never_a_traceback(tmp_path, capsys, kind):
    from lora_merge import families

    src = _dit_file(tmp_path / f"{kind}.safetensors", kind)
    for name in families.names():
        for extra in ([], ["--json"], ["--modules"]):
            code, _, err = run_cli(["inspect", src, "--arch", name, *extra], capsys)
            assert "Traceback" not in err and code in (0, 1, 2), (name, extra, err)


# ------------------------------------------------------------------ the 3,400-case campaign's findings
@pytest.mark.parametrize("text, says", [
    (lambda a: f"inputs: [{a}, {a}]\nweights: " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
    (lambda a: f"inputs: [{{path: {a}, sha256: .nan}}, {a}]\noutput: o.safetensors\n", "'sha256' of input"),
    (lambda a: f"inputs: [{a}, {a}]\noutput: {'x' * 5000}\n", "File name too long"),
])  # fmt: skip
def test_recipe_files_the_campaign_broke_get_one_line(tmp_path, capsys, pair, text, says):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text(pair[0]))
    code, _, err = run_cli(["merge", "--config", recipe], capsys)
    assert code == 2 and says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert len(err) < 600  # a 5,000-character path is cut in the message


def test_priors_refuses_a_special_output_before_printing_anything(tmp_path, capsys, pair):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, out, err = run_cli(["priors", pair[0], "-o", fifo, "--force"], capsys)
    assert code == 4 and out == "" and len(err.strip().splitlines()) == 1 and "FIFO" in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_values_the_output_dtype_cannot_hold_are_an_error_not_infinities(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    src = tmp_path / "big.safetensors"
    save_file({f"{name}.lora_down.weight": torch.full((2, 320), 1e5), f"{name}.lora_up.weight": torch.full((320, 2), 1e-5),
               f"{name}.alpha": torch.tensor(2.0)}, str(src))  # fmt: skip
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(["convert", src, "-o", out, "--dtype", "fp16"], capsys)
    assert code == 2 and "beyond the range of float16" in err and "lora_down" in err and not out.exists(), err


def test_a_dry_run_writes_nothing_even_with_output_and_report(tmp_path, capsys, pair):
    code, _, err = run_cli(["merge", *pair, "-o", tmp_path / "m.safetensors", "--report", tmp_path / "r.json",
                            "--dry-run"], capsys)  # fmt: skip
    assert code == 0 and "nothing written" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("body, says", [
    (["weights: &a [1, 1]", "seed: *a"], "YAML aliases"),
    (["device: [5]"], "'device' must be a device name"),
])  # fmt: skip
def test_recipe_aliases_and_device_types_are_one_line(tmp_path, capsys, pair, body, says):
    recipe = tmp_path / "recipe.yaml"
    lines = [f"inputs: [{pair[0]}, {pair[1]}]", f"output: {tmp_path / 'o.safetensors'}", *body]
    recipe.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(["merge", "--config", recipe], capsys)
    assert code == 2 and says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
