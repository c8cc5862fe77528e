"""``lora-merge inspect``, ``diff`` and ``convert`` as a user runs them (exit codes, stdout/stderr)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
from conftest import PEFT_DIRS, SD15_FILES, shared_fixture
from safetensors.torch import save_file

from lora_merge.cli import main
from lora_merge.errors import PartialReadWarning

FIXTURES = [f"sd15/{n}.safetensors" for n in SD15_FILES] + [f"peft/{n}" for n in PEFT_DIRS]
WRITERS = ["kohya", "diffusers", "peft"]


def run(capsys, *args) -> tuple[int, str, str]:
    """Run ``lora_merge.cli.main`` in-process exactly as the console script does; (exit code, out, err)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), out, err


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err


@pytest.mark.parametrize("rel", FIXTURES)
def test_inspect_json_every_fixture(capsys, rel):
    path = shared_fixture(rel)
    code, out, err = run(capsys, "inspect", path, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["num_modules"] > 0 and s["dialect"] in ("kohya", "diffusers", "peft")
    if rel.startswith("sd15/"):
        assert s["num_modules"] == 128
        assert s["ranks"] == {"min": 4, "max": 4, "mixed": False, "histogram": [{"value": 4, "count": 128}]}
        assert s["architecture"] == "sd1"
    else:
        assert s["dialect"] == "peft"
        assert {e["value"] for e in s["scales"]["histogram"]} in ({2.0}, {4.0})
        assert s["fan_in_fan_out"] is rel.endswith("gpt2_tigrinya")
        assert s["config"]["r"] == 8
        if "distilbert" in rel:  # the modules_to_save classifier heads, listed with their shapes
            assert "classifier" in s["modules_to_save"]
            heads = {e["name"]: e["shape"] for e in s["extra_tensors"]}
            assert heads["classifier.weight"][1] == 768 and heads["classifier.weight"][0] in (2, 6)


def test_inspect_people_output_peft(capsys):
    code, out, err = run(capsys, "inspect", shared_fixture("peft/distilbert_emotion"))
    assert code == 0, err
    for text in ("peft", "distilbert-base-uncased", "modules_to_save", "pre_classifier, classifier, score",
                 "classifier.weight (6, 768)", "fan_in_fan_out", "scale", "lora_alpha"):
        assert text in out, text
    code, out, err = run(capsys, "inspect", shared_fixture("peft/gpt2_tigrinya"))
    assert code == 0, err
    assert re.search(r"fan_in_fan_out\s+True", out) and re.search(r"scale\s+4\b", out)


def test_inspect_modules_and_several_files(capsys):
    a, b = shared_fixture("sd15/pokemon_style.safetensors"), shared_fixture("sd15/sd_lora_2100.safetensors")
    code, out, err = run(capsys, "inspect", a, b, "--json", "--modules")
    assert code == 0, err
    docs = json.loads(out)
    assert isinstance(docs, list) and len(docs) == 2
    rows = docs[0]["modules"]
    assert len(rows) == 128
    assert all(r["norm"] > 0 and 0 < r["effective_rank"] <= 4 for r in rows)
    code, out, err = run(capsys, "inspect", a, "--modules")
    assert code == 0 and "‖ΔW‖_F" in out and "eff. rank" in out


def test_inspect_one_bad_file_among_good(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    good = shared_fixture("sd15/pokemon_style.safetensors")
    code, out, err = run(capsys, "inspect", bad, good, "--json")
    assert code == 2
    docs = json.loads(out)
    assert "error" in docs[0] and docs[1]["num_modules"] == 128
    assert err.startswith(f"error: {bad}")
    _no_traceback(err)


@pytest.mark.parametrize("args,code,needle", [
    (["inspect", "/nonexistent/x.safetensors"], 2, "no such file"),
    (["diff", "/nonexistent/a.safetensors", "/nonexistent/b.safetensors"], 2, "no such file"),
])
def test_errors_are_one_line(capsys, args, code, needle):
    got, out, err = run(capsys, *args)
    assert got == code
    assert out == ""
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    _no_traceback(err)


def test_pickle_refused_without_flag(capsys, tmp_path):
    p = tmp_path / "lora.bin"
    torch.save({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 4),
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(4, 2)}, p)
    code, out, err = run(capsys, "inspect", p)
    assert code == 2 and "pickle" in err and err.startswith("error: ")
    code, out, err = run(capsys, "inspect", p, "--allow-pickle", "--json")
    assert code == 0, err
    assert json.loads(out)["num_modules"] == 1


def test_diff_two_different_loras(capsys):
    a, b = shared_fixture("sd15/pokemon_style.safetensors"), shared_fixture("sd15/rick_and_morty_style.safetensors")
    code, out, err = run(capsys, "diff", a, b, "--json", "--top", "3")
    assert code == 0, err
    r = json.loads(out)
    assert r["num_common"] == 128 and len(r["top"]) == 3 and r["max_rel_diff"] > 0.1
    assert -1 <= r["total"]["cosine"] <= 1
    code, out, err = run(capsys, "diff", a, b, "--fail-above", "0.5")
    assert code == 1 and "error: difference above 0.5" in err
    assert "most different modules" in out and "per block" in out


def test_diff_same_file_is_exactly_zero(capsys):
    a = b = shared_fixture("sd15/pokemon_style.safetensors")
    code, out, err = run(capsys, "diff", a, b, "--json", "--fail-above", "0")
    assert code == 0, err
    assert json.loads(out)["max_rel_diff"] == 0.0


@pytest.mark.parametrize("to", WRITERS)
@pytest.mark.parametrize("rel", FIXTURES)
def test_convert_then_diff_is_zero(capsys, tmp_path, rel, to):
    src = shared_fixture(rel)
    dst = tmp_path / ("out" if to == "peft" else "out.safetensors")
    drops_heads = rel.startswith("peft/distilbert") and to != "peft"
    with pytest.warns(UserWarning, match="cannot hold modules_to_save") if drops_heads else nullcontext():
        code, out, err = run(capsys, "convert", src, dst, "--to", to)
    assert code == 0, err
    assert dst.exists() and f"wrote {dst}" in err
    code, out, err = run(capsys, "diff", src, dst, "--json", "--fail-above", "1e-4")
    assert code == 0, err
    r = json.loads(out)
    assert r["max_rel_diff"] < 1e-6
    assert r["b"]["dialect"] == to and not r["only_in_a"] and not r["only_in_b"]
    # only a PEFT folder can carry modules_to_save heads; the diff reports the dropped ones
    assert bool(r["extra_tensors"]["only_in_a"]) == drops_heads
    if drops_heads:
        assert "warning: non-LoRA tensors (modules_to_save) differ" in err
    # and the converted file inspects like the original
    code, out, err = run(capsys, "inspect", dst, "--json")
    assert code == 0, err
    assert json.loads(out)["num_modules"] == r["a"]["num_modules"]


def test_convert_refuses_overwrite_and_input(capsys, tmp_path):
    src = tmp_path / "in.safetensors"
    shutil.copy(shared_fixture("sd15/sd_lora_2100.safetensors"), src)
    dst = tmp_path / "out.safetensors"
    assert run(capsys, "convert", src, dst, "--to", "kohya")[0] == 0
    code, _out, err = run(capsys, "convert", src, dst, "--to", "kohya")
    assert code == 4 and "--force" in err and err.startswith("error: ")
    assert run(capsys, "convert", src, dst, "--to", "diffusers", "--force")[0] == 0
    code, _out, err = run(capsys, "convert", src, src, "--to", "kohya", "--force")
    assert code == 4 and "input" in err
    code, _out, err = run(capsys, "convert", src, tmp_path / "x.safetensors", "--to", "nonsense")
    assert code == 2 and "nonsense" in err


def test_convert_dtype(capsys, tmp_path):
    src = shared_fixture("sd15/course3_unet_prefixed.safetensors")
    dst = tmp_path / "half.safetensors"
    assert run(capsys, "convert", src, dst, "--to", "diffusers", "--dtype", "fp16")[0] == 0
    code, out, err = run(capsys, "inspect", dst, "--json")
    assert code == 0, err
    assert json.loads(out)["dtypes"] == {"float16": 256}
    _code, out, _err = run(capsys, "diff", src, dst, "--json")
    assert 1e-6 < json.loads(out)["max_rel_diff"] < 1e-2  # fp16 rounding, not zero


def test_help_for_each_command(capsys):
    for cmd in ("inspect", "diff", "convert"):
        code, out, _err = run(capsys, cmd, "--help")
        assert code == 0 and "Usage: lora-merge " + cmd in out


def test_console_script_subprocess(tmp_path):
    """The installed ``lora-merge`` console script: JSON on stdout, and a one-line error with exit 2."""
    exe = shutil.which("lora-merge")
    cmd = [exe] if exe else [sys.executable, "-c", "from lora_merge.cli import main; main()"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fx = shared_fixture("peft/gpt2_tigrinya")
    p = subprocess.run([*cmd, "inspect", str(fx), "--json"], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["fan_in_fan_out"] is True and s["architecture"] == "gpt2"
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(os.urandom(64))
    p = subprocess.run([*cmd, "inspect", str(bad)], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.startswith(f"error: {bad}") and p.stderr.count("\n") == 1, p.stderr


def test_strict_and_unparsed_keys(capsys, tmp_path):
    p = tmp_path / "partial.safetensors"
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{name}.lora_A.weight": torch.randn(2, 8), f"{name}.lora_B.weight": torch.randn(8, 2),
               "unet.something_else.weird": torch.zeros(3)}, str(p))
    with pytest.warns(PartialReadWarning, match="unet.something_else.weird"):
        code, out, err = run(capsys, "inspect", p, "--json")
    assert code == 0
    assert json.loads(out)["unparsed_keys"] == ["unet.something_else.weird"]
    code, out, err = run(capsys, "inspect", p, "--strict")
    assert code == 2 and err.startswith("error: ") and "unet.something_else.weird" in err
