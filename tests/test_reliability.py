"""Nothing lost, nothing overwritten: every output path of a merge is checked before any work
(the adapter, its sidecars, the report: not an input even with --force, not an existing file without it,
not each other, in a folder that exists and is writable); a failure leaves nothing behind; NaN/Inf
values are one-line errors naming the file and tensor; seeded strategies give the same bytes for any
--threads, and every file we write is byte-identical across runs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import lora_merge as lm
from lora_merge import Adapter, LoraModule
from lora_merge.files import atomic_write_text, make_dirs, output_transaction

run = run_cli  # (code, stdout, stderr) of an in-process CLI run


def _adapter(seed: int, n: int = 4, d_out: int = 48, d_in: int = 64, r: int = 4, dialect="kohya") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect=dialect)
    for i in range(n):
        name = f"unet.down_blocks.1.attentions.0.transformer_blocks.{i}.attn1.to_q"
        ad.modules[name] = LoraModule.from_tensors(name, torch.randn(r, d_in, generator=g),
                                                   torch.randn(d_out, r, generator=g), alpha=r / 2)
    return ad


@pytest.fixture
def pair(tmp_path):
    return [lm.save(_adapter(i), tmp_path / f"in{i}.safetensors") for i in range(2)]


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(code, err, want_code=None):
    assert code != 0 and (want_code is None or code == want_code), err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------- --report and sidecars
@pytest.mark.parametrize("force", [False, True])
def test_report_onto_an_input_is_refused_even_with_force(tmp_path, pair, capsys, force):
    before = _digests(tmp_path)
    code, _, err = run(["merge", *pair, "-o", tmp_path / "out.safetensors", "--report", pair[1],
                        *(["--force"] if force else [])], capsys)
    _one_line_error(code, err, 4)
    assert "input" in err and _digests(tmp_path) == before


def test_report_onto_an_input_through_a_symlink_and_dotdot(tmp_path, pair, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(pair[0])
    before = _digests(tmp_path)
    for report in (tmp_path / "link.json", tmp_path / "sub" / ".." / pair[0].name):
        code, _, err = run(["merge", *pair, "-o", tmp_path / "out.safetensors", "--report", report, "--force"],
                           capsys)
        _one_line_error(code, err, 4)
    assert _digests(tmp_path) == before and not (tmp_path / "out.safetensors").exists()


def test_report_onto_the_merged_output_is_refused(tmp_path, pair, capsys):
    out = tmp_path / "out.safetensors"
    for extra in ([], ["--force"]):
        code, _, err = run(["merge", *pair, "-o", out, "--report", out, *extra], capsys)
        _one_line_error(code, err, 2)
        assert "another output" in err and not out.exists()


def test_report_onto_an_existing_file_needs_force(tmp_path, pair, capsys):
    rep = tmp_path / "notes.txt"
    rep.write_text("keep me")
    code, _, err = run(["merge", *pair, "-o", tmp_path / "out.safetensors", "--report", rep], capsys)
    _one_line_error(code, err, 4)
    assert rep.read_text() == "keep me" and not (tmp_path / "out.safetensors").exists()
    code, _, err = run(["merge", *pair, "-o", tmp_path / "out.safetensors", "--report", rep, "--force"], capsys)
    assert code == 0, err
    assert json.loads(rep.read_text())["recipe"]["strategy"] == "linear"


@pytest.mark.parametrize("force", [False, True])
def test_mask_sidecar_onto_an_input_is_refused_even_with_force(tmp_path, capsys, force):
    # the second input is named like the first's mask sidecar would be
    a = lm.save(_adapter(0), tmp_path / "out.safetensors.masks.safetensors")
    b = lm.save(_adapter(1), tmp_path / "b.safetensors")
    before = _digests(tmp_path)
    code, _, err = run(["merge", a, b, "-s", "ziplora", "--arch", "sdxl", "-o", tmp_path / "out.safetensors",
                        *(["--force"] if force else [])], capsys)
    _one_line_error(code, err, 4)
    assert _digests(tmp_path) == before


def test_report_onto_the_sidecar_is_refused(tmp_path, pair, capsys):
    out = tmp_path / "out.safetensors"
    code, _, err = run(["merge", *pair, "-s", "ziplora", "--arch", "sdxl", "-o", out, "--report",
                        tmp_path / "out.safetensors.masks.safetensors"], capsys)
    _one_line_error(code, err, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in0.safetensors", "in1.safetensors"]


# ---------------------------------------------------------------- output folders, checked before any work
@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the layer loop runs."""
    import lora_merge.engine.run as run_mod

    def boom(*a, **k):
        raise AssertionError("the merge was computed before its output paths were checked")

    monkeypatch.setattr(run_mod, "run_layers", boom)


def test_peft_first_input_with_a_safetensors_output_fails_before_computing(tmp_path, capsys, no_compute):
    peft = lm.save(_adapter(0, dialect="peft"), tmp_path / "peft_in")
    other = lm.save(_adapter(1), tmp_path / "b.safetensors")
    # SD LoRAs default to the kohya dialect, so the PEFT output is asked for explicitly
    code, _, err = run(["merge", peft, other, "-o", tmp_path / "out.safetensors", "--to", "peft"], capsys)
    _one_line_error(code, err, 2)
    assert "folder" in err and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("case", ["missing folder", "parent is a file", "report folder missing",
                                  "output is a folder", "config is a folder"])
def test_bad_output_places_fail_before_computing(tmp_path, pair, capsys, no_compute, case):
    (tmp_path / "plain.txt").write_text("x")
    argv = ["merge", *pair]
    if case == "missing folder":
        argv += ["-o", tmp_path / "nope" / "out.safetensors"]
    elif case == "parent is a file":
        argv += ["-o", tmp_path / "plain.txt" / "out.safetensors"]
    elif case == "report folder missing":
        argv += ["-o", tmp_path / "out.safetensors", "--report", tmp_path / "nope" / "r.json"]
    elif case == "output is a folder":
        (tmp_path / "dir.safetensors").mkdir()
        argv += ["-o", tmp_path / "dir.safetensors", "--force"]
    else:
        (tmp_path / "peft_out" / "adapter_config.json").mkdir(parents=True)
        argv += ["-o", tmp_path / "peft_out", "--to", "peft", "--force"]
    before = _digests(tmp_path)
    code, _, err = run(argv, capsys)
    _one_line_error(code, err)
    assert _digests(tmp_path) == before
    assert not (tmp_path / "nope").exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path, pair, capsys, no_compute):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run(["merge", *pair, "-o", ro / "out.safetensors"], capsys)
        _one_line_error(code, err, 2)
        assert "not writable" in err and list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_a_failure_after_the_adapter_was_written_leaves_nothing(tmp_path, pair, monkeypatch, capsys):
    import lora_merge.engine.run as run_mod

    def broken_report(path, report):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_mod, "write_report", broken_report)
    before = _digests(tmp_path)
    with pytest.raises(OSError):
        lm.merge(pair, tmp_path / "peft_out" / "deeper", to="peft", report_path=tmp_path / "r.json")
    assert _digests(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "in0.safetensors", "in1.safetensors"]  # no adapter, no temporary file, no folder made on the way


def test_transaction_renames_at_the_end_and_cleans_up_on_interrupt(tmp_path):
    with output_transaction():
        atomic_write_text(tmp_path / "a.txt", "a")
        assert not (tmp_path / "a.txt").exists()  # still a temporary file
    assert (tmp_path / "a.txt").read_text() == "a"
    with pytest.raises(KeyboardInterrupt), output_transaction():
        make_dirs(tmp_path / "x" / "y")
        atomic_write_text(tmp_path / "x" / "y" / "b.txt", "b")
        atomic_write_text(tmp_path / "c.txt", "c")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_written_files_get_the_usual_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        with output_transaction():
            atomic_write_text(tmp_path / "a.txt", "a")
        atomic_write_text(tmp_path / "b.txt", "b")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- values
def _poison(path: Path, key_part: str, value: float) -> Path:
    """A copy of a safetensors file with one element of the first tensor matching ``key_part`` replaced."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    k = next(k for k in sorted(t) if key_part in k)
    t[k] = t[k].clone()
    t[k].view(-1)[0] = value
    out = path.with_name(f"bad_{path.name}")
    save_file(t, str(out))
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", ["merge", "merge-rank", "merge-ties", "convert", "diff", "inspect"])
def test_non_finite_values_name_the_file_and_tensor(tmp_path, pair, capsys, command, value):
    bad = _poison(pair[1], "lora_down", value)
    out = tmp_path / "out.safetensors"
    argv = {"merge": ["merge", pair[0], bad, "-o", out],
            "merge-rank": ["merge", pair[0], bad, "-o", out, "--rank", "2"],
            "merge-ties": ["merge", pair[0], bad, "-o", out, "-s", "ties"],
            "convert": ["convert", bad, out, "--to", "diffusers"],
            "diff": ["diff", pair[0], bad],
            "inspect": ["inspect", "--modules", bad]}[command]
    code, _, err = run(argv, capsys)
    _one_line_error(code, err, 2)
    assert str(bad) in err and "lora_down" in err and "NaN or infinite" in err
    assert not out.exists()


def test_overflowing_fp16_output_is_a_merge_error(tmp_path, capsys):
    big = _adapter(0)
    for m in big:
        m.up = lm.TensorRef.from_tensor(m.up.load() * 1e6)
        m.down = lm.TensorRef.from_tensor(m.down.load() * 1e6)
    p = lm.save(big, tmp_path / "big.safetensors")
    code, _, err = run(["merge", p, p, "-o", tmp_path / "out.safetensors", "--dtype", "fp16"], capsys)
    _one_line_error(code, err, 3)
    assert "not finite" in err and "module unet." in err and not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------- determinism
def _sdxl_like(tmp_path: Path) -> list[Path]:
    """Layers big enough that a multi-threaded GEMM rounds differently from a single-threaded one."""
    g = torch.Generator().manual_seed(11)
    paths = []
    for i in range(2):
        ad = Adapter(dialect="kohya")
        for j in range(6):
            name = f"unet.down_blocks.1.attentions.0.transformer_blocks.{j}.attn1.to_k"
            ad.modules[name] = LoraModule.from_tensors(name, torch.randn(16, 640, generator=g),
                                                       torch.randn(640, 16, generator=g), alpha=8.0)
        paths.append(lm.save(ad, tmp_path / f"x{i}.safetensors"))
    return paths


@pytest.mark.parametrize("params", [["-s", "dare", "--seed", "1"],
                                    ["-s", "dare", "--seed", "1", "--variant", "ties"],
                                    ["-s", "ziplora", "--arch", "sdxl", "--seed", "2", "--param", "steps=3",
                                     "--rank", "8"],
                                    ["-s", "duolora", "--arch", "sdxl", "--seed", "2", "--param", "steps=3"]])
def test_seeded_strategies_give_the_same_bytes_for_any_threads(tmp_path, capsys, params):
    inputs = _sdxl_like(tmp_path)
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.safetensors"
        code, _, err = run(["merge", *inputs, "-o", out, "--threads", threads, *params], capsys)
        assert code == 0, err
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("strategy", ["ziplora", "duolora"])
def test_every_written_file_is_byte_identical_across_runs(tmp_path, pair, capsys, strategy):
    digests = []
    for i in range(2):
        out = tmp_path / f"run{i}" / "out.safetensors"
        out.parent.mkdir()
        code, _, err = run(["merge", *pair, "-s", strategy, "--arch", "sdxl", "-o", out, "--report",
                            out.parent / "report.json", "--param", "steps=3"], capsys)
        assert code == 0, err
        assert (out.parent / "out.safetensors.masks.safetensors").exists()
        digests.append(_digests(out.parent))
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.parent.iterdir()}
        assert len(set(modes.values())) == 1, modes  # sidecars get the outputs' mode (were 0600)
    assert digests[0] == digests[1] and len(digests[0]) == 3


# ---------------------------------------------------------------- pickle inputs
def test_merge_reads_pickle_inputs_only_with_allow_pickle(tmp_path, pair, capsys):
    from safetensors.torch import load_file

    pt = tmp_path / "in1.bin"
    torch.save(load_file(str(pair[1])), pt)
    out = tmp_path / "out.safetensors"
    code, _, err = run(["merge", pair[0], pt, "-o", out], capsys)
    _one_line_error(code, err, 2)
    assert "pickle" in err and "--allow-pickle" in err and not out.exists()
    code, _, err = run(["merge", pair[0], pt, "-o", out, "--allow-pickle"], capsys)
    assert code == 0, err
    ref = tmp_path / "ref.safetensors"
    assert run(["merge", *pair, "-o", ref], capsys)[0] == 0
    assert lm.load(out).modules.keys() == lm.load(ref).modules.keys()
