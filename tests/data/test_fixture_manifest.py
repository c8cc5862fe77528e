"""The generated look-alikes of the real-world fixtures (tests/data/README.md): they carry exactly the
manifest's keys, shapes, dtypes, metadata, configs and value statistics, the same bytes on every run, and
``LORA_MERGE_TEST_FIXTURES`` picks between them and the real files."""
from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager

import conftest
import pytest

_spec = importlib.util.spec_from_file_location("make_fixture_manifest",
                                               conftest.REPO / "tests" / "data" / "make_fixture_manifest.py")
mfm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mfm)


@contextmanager
def _own_cache():
    """``generated_fixture`` writing afresh (into the ``root`` given), the session's cache left as it was."""
    saved = dict(conftest._GENERATED)
    conftest._GENERATED.clear()
    try:
        yield
    finally:
        conftest._GENERATED.clear()
        conftest._GENERATED.update(saved)


def _layout(manifest: dict) -> dict:
    """The manifest without the value statistics (what must match exactly)."""
    out = {}
    for rel, entry in manifest["fixtures"].items():
        files = {name: {"metadata": d["metadata"],
                        "tensors": {k: (t["shape"], t["dtype"]) for k, t in d["tensors"].items()}}
                 for name, d in entry["files"].items()}
        out[rel] = (entry.get("adapter_config"), files)
    return out


def test_lookalikes_reproduce_the_manifest(tmp_path):
    manifest = json.loads(conftest.FIXTURE_MANIFEST.read_text())
    assert set(manifest["fixtures"]) == set(mfm.SOURCES)
    with _own_cache():
        for rel in manifest["fixtures"]:
            conftest.generated_fixture(rel, root=tmp_path)
    again = mfm.build(tmp_path)
    assert _layout(again) == _layout(manifest)
    for rel, entry in manifest["fixtures"].items():
        for name, desc in entry["files"].items():
            for key, t in desc["tensors"].items():
                got = again["fixtures"][rel]["files"][name]["tensors"][key]
                assert got["std"] == pytest.approx(t["std"], rel=2e-3), (rel, key)
                assert got["mean"] == pytest.approx(t["mean"], rel=2e-3, abs=1e-3 * t["std"]), (rel, key)
    # the manifest as committed is what the script writes for these facts
    assert mfm.dump(manifest) == conftest.FIXTURE_MANIFEST.read_text()


def test_lookalikes_are_deterministic_and_read_only(tmp_path):
    a = conftest.generated_fixture("sd15/course3_unet_prefixed.safetensors")  # the session's copy
    with _own_cache():
        b = conftest.generated_fixture("sd15/course3_unet_prefixed.safetensors", root=tmp_path)
    assert a != b and a.read_bytes() == b.read_bytes()
    assert not a.stat().st_mode & 0o222


def test_real_files_match_the_manifest_when_present():
    """On a maintainer's machine: the committed manifest is up to date with the real files."""
    if not conftest.SHARED_FIXTURES.is_dir():
        return  # (a clone has only the manifest; nothing to compare it with)
    assert mfm.dump(mfm.build(conftest.SHARED_FIXTURES)) == conftest.FIXTURE_MANIFEST.read_text()


def test_the_environment_variable_picks_the_source(monkeypatch, tmp_path):
    monkeypatch.setenv(conftest.FIXTURES_ENV, "generated")
    assert conftest.fixtures_source() == "generated"
    assert conftest.shared_fixture("peft/gpt2_tigrinya") == conftest.generated_fixture("peft/gpt2_tigrinya")
    monkeypatch.setenv(conftest.FIXTURES_ENV, "real")
    assert conftest.fixtures_source() == "real"
    monkeypatch.setenv(conftest.FIXTURES_ENV, "nonsense")
    with pytest.raises(pytest.UsageError, match="auto, real or generated"):
        conftest.fixtures_source()
    monkeypatch.delenv(conftest.FIXTURES_ENV)
    monkeypatch.setattr(conftest, "SHARED_FIXTURES", tmp_path / "absent")
    assert conftest.fixtures_source() == "generated"
    monkeypatch.setattr(conftest, "SHARED_FIXTURES", tmp_path)
    assert conftest.fixtures_source() == "real"
