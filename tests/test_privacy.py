"""Privacy: a merged file names its inputs (file name, PEFT folder name) and their sha256, never the
user's folders, unless --record-paths asks for the full paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import lora_merge as lm
from lora_merge.cli import main
from lora_merge.engine.recipe import recorded_name

REPLAY = Path(__file__).parent / "data" / "replay"


def _cli(argv):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code


def _all_text(path: Path) -> str:
    ad = lm.load(path)
    return json.dumps(ad.metadata)


def test_no_absolute_path_in_merged_metadata(tmp_path):
    deep = tmp_path / "private" / "user folder"
    deep.mkdir(parents=True)
    for f in ("in1.safetensors", "in2.safetensors"):
        shutil.copy(REPLAY / f, deep / f)
    out = tmp_path / "m.safetensors"
    assert _cli(["merge", deep / "in1.safetensors", deep / "in2.safetensors", "-o", out, "--rank", "4",
                 "--report", tmp_path / "r.json"]) == 0
    text = _all_text(out)
    assert str(tmp_path) not in text and "private" not in text
    rec = json.loads(lm.load(out).metadata["lora_merge.recipe"])
    assert [i["path"] for i in rec["inputs"]] == ["in1.safetensors", "in2.safetensors"]
    assert all(len(i["sha256"]) == 64 for i in rec["inputs"])
    assert str(tmp_path) not in (tmp_path / "r.json").read_text()


def test_record_paths_flag_keeps_full_paths(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shutil.copy(REPLAY / "in1.safetensors", a)
    shutil.copy(REPLAY / "in2.safetensors", b)
    out = tmp_path / "m.safetensors"
    assert _cli(["merge", a, b, "-o", out, "--rank", "4", "--record-paths"]) == 0
    rec = json.loads(lm.load(out).metadata["lora_merge.recipe"])
    assert [i["path"] for i in rec["inputs"]] == [str(a), str(b)]
    r2 = lm.merge([a, b], tmp_path / "m2.safetensors", rank=4, record_paths=True)
    assert r2.report["recipe"]["inputs"][0]["path"] == str(a)


def test_recorded_name_of_peft_folders():
    assert recorded_name("/home/me/loras/style_peft") == "style_peft"
    assert recorded_name("/home/me/loras/style_peft/adapter_model.safetensors") == "style_peft/adapter_model.safetensors"
    assert recorded_name("/x/y/z.safetensors") == "z.safetensors"
