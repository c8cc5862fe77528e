"""What an output path may be: a regular file or a missing path (a PEFT adapter: a folder) — never a
device, FIFO, socket or folder, ``--force`` or not, also behind a link; a trailing '/' on a file path is an
error; ``merge`` without ``-o`` says nothing was written only with ``--dry-run``; recipe files with a path
that is not a string or bytes that are not UTF-8 get one line; a rank truncation reports what it lost.
Every special file here is made in the test's own temporary folder."""

from __future__ import annotations

import os
import stat

import pytest

from lora_merge.toyworld import bundled_loras

from conftest import run_cli


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
