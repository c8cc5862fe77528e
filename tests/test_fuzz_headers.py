"""Property test: corrupted copies of real files either load (and read fully) or raise LoraMergeError —
never another exception, never a hang."""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
from conftest import shared_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_merge
from lora_merge.errors import LoraMergeError

FIXTURES = ["sd15/pokemon_style.safetensors", "sd15/sd_lora_2100.safetensors",
            "peft/gpt2_tigrinya/adapter_model.safetensors"]
SETTINGS = settings(max_examples=40, deadline=5000,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def _load_fully(data: bytes, name: str, peft_config: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        if peft_config:
            p = Path(d) / "adapter_model.safetensors"
            cfg = shared_fixture("peft/gpt2_tigrinya/adapter_config.json")
            shutil.copy(cfg, Path(d) / "adapter_config.json")
        else:
            p = Path(d) / name
        p.write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ad = lora_merge.load(p)
                for m in ad:
                    m.factors()
                for t in ad.extra_tensors.values():
                    t.load()
            except LoraMergeError as e:
                assert "\n" not in str(e) and str(e).startswith(str(p))


def _fixture_bytes(rel: str) -> bytes:
    return shared_fixture(rel).read_bytes()


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),          # xor one header byte
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),               # cut the file short
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.just(0)),             # bogus length prefix
    st.tuples(st.just("data"), st.integers(0, 10**9), st.integers(1, 255)),          # xor one data byte
    st.tuples(st.just("splice"), st.integers(0, 10**9), st.integers(0, 2**31)),      # random text in the JSON
)


def _mutate(data: bytes, kind: str, pos: int, val: int, text: str) -> bytes:
    b = bytearray(data)
    hl = _header_len(data)
    if kind == "flip":
        i = pos % hl
        b[i] ^= val
    elif kind == "truncate":
        del b[pos % len(b):]
    elif kind == "length":
        b[:8] = struct.pack("<Q", pos)
    elif kind == "data":
        i = hl + pos % (len(b) - hl)
        b[i] ^= val
    else:
        i = 8 + pos % (hl - 8)
        b[i:i + val % 40] = text.encode("utf-8", "surrogatepass")[: val % 40 or 1]
    return bytes(b)


@pytest.mark.parametrize("rel", FIXTURES)
@SETTINGS
@given(mutation=mutations, text=st.text(max_size=20))
def test_corrupted_files_never_crash(rel, mutation, text):
    data = _fixture_bytes(rel)
    _load_fully(_mutate(data, *mutation, text), Path(rel).name, rel.startswith("peft"))


@SETTINGS
@given(key=st.text(min_size=1, max_size=30), shape=st.lists(st.integers(-2, 6), max_size=4),
       dtype=st.sampled_from(["F32", "F16", "BF16", "I8", "BOOL", "X", "F64"]),
       offsets=st.lists(st.integers(-5, 300), max_size=3), meta=st.dictionaries(st.text(max_size=5),
                                                                                  st.one_of(st.text(max_size=5),
                                                                                            st.integers())))
def test_synthetic_headers_never_crash(key, shape, dtype, offsets, meta):
    header = {"__metadata__": meta, key: {"dtype": dtype, "shape": shape, "data_offsets": offsets},
              "lora_unet_a_to_q.lora_up.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]}}
    raw = json.dumps(header).encode()
    _load_fully(struct.pack("<Q", len(raw)) + raw + b"\0" * 64, "s.safetensors", False)
