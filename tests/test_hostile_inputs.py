"""Bounded cost and checked values on hostile inputs: a FIFO or device is never opened for
reading, headers with more tensors or larger tensors than any adapter has are refused with the limit and
how to raise it, a 100,000-entry metadata header is summarised by ``inspect``, duplicate JSON keys and
wrongly typed PEFT configs are one-line errors naming the key."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

import lora_merge as lm
from lora_merge import Adapter, LoraModule

REPO = Path(__file__).resolve().parents[1]


run = run_cli  # (code, stdout, stderr) of an in-process CLI run


def _one_line_error(code, err, want_code=None):
    assert code != 0 and (want_code is None or code == want_code), err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def _kohya(tmp_path: Path, name="a.safetensors", **extra) -> Path:
    g = torch.Generator().manual_seed(0)
    t = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, generator=g),
         "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, generator=g),
         **extra}
    p = tmp_path / name
    save_file(t, str(p))
    return p


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write_raw(path: Path, header_text: str, body: bytes) -> Path:
    blob = header_text.encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)
    return path


# ---------------------------------------------------------------- never block on a FIFO
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("where", ["file", "peft-weights", "peft-config"])
def test_a_fifo_input_is_refused_without_blocking(tmp_path, where):
    if where == "file":
        os.mkfifo(tmp_path / "x.safetensors")
        target = tmp_path / "x.safetensors"
    else:
        folder = tmp_path / "peft"
        lm.save(Adapter(modules={"m.q": LoraModule.from_tensors("m.q", torch.ones(2, 4), torch.ones(4, 2))},
                        dialect="peft"), folder)
        name = "adapter_model.safetensors" if where == "peft-weights" else "adapter_config.json"
        (folder / name).unlink()
        os.mkfifo(folder / name)
        target = folder
    code = f"import sys; from lora_merge.cli import main; main(['inspect', {str(target)!r}])"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert time.monotonic() - t0 < 60
    assert proc.returncode == 2 and "FIFO" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


# ---------------------------------------------------------------- limits
def test_too_many_tensors_is_refused_with_the_limit(tmp_path, capsys, monkeypatch):
    n = 60_000
    header = {f"t{i}.lora_down.weight": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    p = _write_raw(tmp_path / "many.safetensors", json.dumps(header), b"\0" * n)
    t0 = time.monotonic()
    code, _, err = run(["inspect", p], capsys)
    _one_line_error(code, err, 2)
    assert "60,000 tensors" in err and "LORA_MERGE_MAX_TENSORS" in err and time.monotonic() - t0 < 10


def test_a_huge_declared_tensor_is_refused_before_reading(tmp_path, capsys):
    size = 40 * 2**30  # declared; the file is sparse
    header = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight":
              {"dtype": "F32", "shape": [4, size // 16], "data_offsets": [0, size // 4]},
              "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight":
              {"dtype": "F32", "shape": [size // 16, 4], "data_offsets": [size // 4, size // 2]}}
    p = _write_raw(tmp_path / "huge.safetensors", json.dumps(header), b"")
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size + size // 2)
    for argv in (["inspect", p], ["merge", p, p, "-o", tmp_path / "o.safetensors"]):
        code, _, err = run(argv, capsys)
        _one_line_error(code, err, 2)
        assert "LORA_MERGE_MAX_TENSOR_BYTES" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_a_100k_entry_metadata_header_is_summarised_by_inspect(tmp_path, capsys):
    p = _kohya(tmp_path)
    header, body = _header(p)
    header["__metadata__"] = {f"key_{i}": "v" * 8 for i in range(100_000)}
    _write_raw(p, json.dumps(header), body)
    t0 = time.monotonic()
    code, out, err = run(["inspect", p], capsys)
    assert code == 0, err
    assert "99,940 more entries" in out and out.count("key_") <= 61
    assert time.monotonic() - t0 < 15  # was minutes: every entry rendered as a table row
    code, out, _ = run(["inspect", "--json", p], capsys)
    assert code == 0 and len(json.loads(out)["metadata"]["other"]) == 100_000


def test_a_huge_tensor_name_is_not_echoed_whole(tmp_path, capsys):
    p = _kohya(tmp_path)
    header, body = _header(p)
    k = next(iter(k for k in header if k != "__metadata__"))
    header["x" * 10_000_000] = header.pop(k)
    header["x" * 10_000_000]["dtype"] = ["F32"]
    _write_raw(p, json.dumps(header), body)
    code, _, err = run(["inspect", p], capsys)
    _one_line_error(code, err, 2)
    assert len(err) < 500 and "10,000,000 characters" in err


@pytest.mark.parametrize("dtype", [["F32"], {"a": 1}, None, 3])
def test_a_dtype_that_is_not_a_string_is_a_format_error(tmp_path, capsys, dtype):
    p = _kohya(tmp_path)
    header, body = _header(p)
    k = next(iter(k for k in header if k != "__metadata__"))
    header[k]["dtype"] = dtype
    _write_raw(p, json.dumps(header), body)
    code, _, err = run(["inspect", p], capsys)
    _one_line_error(code, err, 2)
    assert "unknown dtype" in err


def test_duplicate_header_keys_are_refused(tmp_path, capsys):
    p = _kohya(tmp_path)
    header, body = _header(p)
    k = next(iter(k for k in header if k != "__metadata__"))
    text = json.dumps(header)
    text = "{" + json.dumps(k) + ":" + json.dumps(header[k]) + "," + text[1:]
    _write_raw(p, text, body)
    code, _, err = run(["inspect", p], capsys)
    _one_line_error(code, err, 2)
    assert "appears twice" in err


# ---------------------------------------------------------------- PEFT configs, checked by type
@pytest.fixture
def peft_folder(tmp_path):
    ad = Adapter(dialect="peft", config={"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]})
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        ad.modules[f"enc.{i}.q"] = LoraModule.from_tensors(f"enc.{i}.q", torch.randn(2, 8, generator=g),
                                                           torch.randn(8, 2, generator=g), alpha=4.0)
    return lm.save(ad, tmp_path / "peft")


@pytest.mark.parametrize("key,value", [
    ("lora_alpha", None), ("lora_alpha", [8]), ("lora_alpha", "8"), ("r", "8"), ("r", 0),
    ("alpha_pattern", "x"), ("alpha_pattern", {"(": 2}), ("alpha_pattern", {"q": "2"}), ("rank_pattern", {"q": 2.5}),
    ("target_modules", "re:("), ("target_modules", [1, 2]), ("target_modules", [None]),
    ("modules_to_save", [1]), ("modules_to_save", "classifier"), ("use_dora", "false"), ("use_rslora", "true"),
    ("fan_in_fan_out", 1),
])  # fmt: skip
@pytest.mark.parametrize("command", ["inspect", "convert", "merge"])
def test_wrongly_typed_peft_config_names_the_key(tmp_path, capsys, peft_folder, key, value, command):
    cfg_path = peft_folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    argv = {"inspect": ["inspect", peft_folder], "convert": ["convert", peft_folder, out, "--to", "peft"],
            "merge": ["merge", peft_folder, peft_folder, "-o", out]}[command]
    code, _, err = run(argv, capsys)
    _one_line_error(code, err, 2)
    assert "adapter_config.json" in err and key in err and not out.exists()


def test_nan_lora_alpha_and_duplicate_config_keys(tmp_path, capsys, peft_folder):
    cfg_path = peft_folder / "adapter_config.json"
    text = cfg_path.read_text()
    cfg_path.write_text(json.dumps({**json.loads(text), "lora_alpha": float("nan")}))  # json writes NaN
    code, _, err = run(["inspect", peft_folder], capsys)
    _one_line_error(code, err, 2)
    assert "lora_alpha" in err
    cfg_path.write_text('{"r": 64, ' + text.lstrip()[1:])
    code, _, err = run(["inspect", peft_folder], capsys)
    _one_line_error(code, err, 2)
    assert "'r'" in err and "twice" in err


def test_convert_to_a_new_peft_folder_leaves_nothing_on_failure(tmp_path, capsys):
    p = _kohya(tmp_path)
    t = load_file(str(p))
    t["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"][0, 0] = float("inf")
    save_file(t, str(p))
    code, _, err = run(["convert", p, tmp_path / "new" / "deeper", "--to", "peft"], capsys)
    _one_line_error(code, err, 2)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.safetensors"]


@pytest.mark.parametrize("to", ["diffusers", "peft"])
def test_convert_interrupted_mid_write_leaves_nothing(tmp_path, capsys, monkeypatch, to):
    import lora_merge.formats.safetensors_io as io
    from lora_merge.errors import Interrupted

    p = _kohya(tmp_path)
    real = io._serialize

    def half(tensors, md, fh):
        fh.write(b"partial")
        raise Interrupted  # what the CLI's SIGINT/SIGTERM handler raises

    monkeypatch.setattr(io, "_serialize", half)
    out = tmp_path / ("out.safetensors" if to == "diffusers" else "new_folder")
    code, _, err = run(["convert", p, out, "--to", to], capsys)
    assert code == 130 and err.strip() == "interrupted"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.safetensors"]
    monkeypatch.setattr(io, "_serialize", real)
    code, _, err = run(["convert", p, out, "--to", to], capsys)
    assert code == 0, err
