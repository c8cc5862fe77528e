"""Bad input gets one clear line naming the file and the problem, never a traceback from a library."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import shared_fixture
from safetensors.torch import save_file

import lora_merge
from lora_merge.errors import FormatError, PartialReadWarning, UnsupportedAdapterError


def _write(tmp_path, tensors, name="x.safetensors", metadata=None):
    p = tmp_path / name
    save_file(tensors, p, metadata=metadata)
    return p


def _z(*shape):
    return torch.zeros(*shape)


def _kohya_pair(name, r=2, d=4):
    return {f"{name}.lora_down.weight": _z(r, d), f"{name}.lora_up.weight": _z(d, r),
            f"{name}.alpha": torch.tensor(1.0)}


UNSUPPORTED = [
    ("LyCORIS Tucker LoCon",
     {**_kohya_pair("lora_unet_a_conv1"), "lora_unet_a_conv1.lora_mid.weight": _z(2, 2, 3, 3)}, "lora_mid"),
    ("DoRA", {**_kohya_pair("lora_unet_a_to_q"), "lora_unet_a_to_q.dora_scale": _z(1, 4)}, "dora_scale"),
    ("DoRA", {"unet.a.to_q.lora_A.weight": _z(2, 4), "unet.a.to_q.lora_B.weight": _z(4, 2),
              "unet.a.to_q.lora_magnitude_vector": _z(4)}, "lora_magnitude_vector"),
    ("OFT", {"lora_unet_a_to_q.oft_blocks": _z(2, 2, 2)}, "oft_blocks"),
    ("LyCORIS GLoRA", {"lora_unet_a_to_q.a1.weight": _z(2, 4), "lora_unet_a_to_q.a2.weight": _z(4, 2),
                       "lora_unet_a_to_q.b1.weight": _z(2, 4), "lora_unet_a_to_q.b2.weight": _z(4, 2)}, "a1"),
    ("IA3", {"lora_unet_a_to_k.weight": _z(4), "lora_unet_a_to_k.on_input": torch.tensor(True)}, "on_input"),
    ("IA3", {"base_model.model.a.k.ia3_l.default": _z(4, 1)}, "ia3_l"),
]


@pytest.mark.parametrize("kind,tensors,shown", UNSUPPORTED,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(UNSUPPORTED)])
def test_not_plain_lora_is_named(tmp_path, kind, tensors, shown):
    p = _write(tmp_path, tensors)
    with pytest.raises(UnsupportedAdapterError) as ei:
        lora_merge.load(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: {kind} ") and msg.endswith("not a plain LoRA") and "\n" not in msg
    assert shown in msg
    assert ei.value.exit_code != 0


def test_tucker_locon_message_exact(tmp_path):  # (LoHa/LoKr are read now: tests/test_lycoris.py)
    p = _write(tmp_path, UNSUPPORTED[0][1], name="x.safetensors")
    expected = r"x\.safetensors: LyCORIS Tucker LoCon adapter \(lora_mid\), not a plain LoRA$"
    with pytest.raises(UnsupportedAdapterError, match=expected):
        lora_merge.load(p)


@pytest.mark.parametrize("config_patch,match", [({"peft_type": "IA3"}, "PEFT IA3 adapter"),
                                                ({"use_dora": True}, "DoRA adapter")])
def test_peft_config_not_plain_lora(tmp_path, config_patch, match):
    d = tmp_path / "ad"
    d.mkdir()
    _write(d, {"base_model.model.a.lora_A.weight": _z(2, 4), "base_model.model.a.lora_B.weight": _z(4, 2)},
           name="adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config_patch}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedAdapterError, match=match):
        lora_merge.load(d)


def _valid_bytes(tmp_path):
    return _write(tmp_path, _kohya_pair("lora_unet_a_to_q"), name="ok.safetensors").read_bytes()


def _err(tmp_path, data: bytes, match: str, name="bad.safetensors"):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(FormatError, match=match) as ei:
        ad = lora_merge.load(p)
        for m in ad:
            m.factors()
    assert str(ei.value).startswith(f"{p}: ") and "\n" not in str(ei.value)


def test_truncated(tmp_path):
    data = _valid_bytes(tmp_path)
    _err(tmp_path, data[:-5], "truncated")
    _err(tmp_path, data[:4], "only 4 bytes")
    _err(tmp_path, data[:40], "truncated")


def test_empty_and_garbage(tmp_path):
    _err(tmp_path, b"", "only 0 bytes")
    _err(tmp_path, bytes(range(256)) * 40, "header")
    _err(tmp_path, b"PK\x03\x04" + b"\x00" * 100, "header")


def _with_header(header: dict | str, data: bytes = b"") -> bytes:
    h = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_bad_header_json(tmp_path):
    _err(tmp_path, _with_header('{"a": [1, 2'), "bad safetensors header JSON")
    _err(tmp_path, _with_header("[1, 2]"), "not a JSON object")
    _err(tmp_path, _with_header({"__metadata__": {"a": 1}}), "__metadata__")


def test_offsets_outside_the_file(tmp_path):
    h = {"a.lora_down.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
         "a.lora_up.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 1 << 40]}}
    _err(tmp_path, _with_header(h, b"\0" * 32), "outside the file")
    h["a.lora_up.weight"]["data_offsets"] = [16, 24]
    _err(tmp_path, _with_header(h, b"\0" * 32), "needs 16 bytes")
    h["a.lora_up.weight"] = {"dtype": "F33", "shape": [2, 2], "data_offsets": [16, 32]}
    _err(tmp_path, _with_header(h, b"\0" * 32), "unknown dtype")
    h["a.lora_up.weight"] = {"dtype": "F32", "shape": [2, -2], "data_offsets": [16, 32]}
    _err(tmp_path, _with_header(h, b"\0" * 32), "invalid shape")
    h["a.lora_up.weight"] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}
    _err(tmp_path, _with_header(h, b"\0" * 32), "layout")


def test_huge_header_length(tmp_path):
    _err(tmp_path, struct.pack("<Q", 1 << 62) + b"{}", "header length")


def test_ab_shape_mismatch(tmp_path):
    p = _write(tmp_path, {"lora_unet_a_to_q.lora_down.weight": _z(4, 8),
                          "lora_unet_a_to_q.lora_up.weight": _z(8, 2)})
    expected = r"A/B shape mismatch: down \(A\) has rank 4 but up \(B\) has rank 2"
    with pytest.raises(FormatError, match=expected):
        lora_merge.load(p)
    p = _write(tmp_path, {"unet.a.to_q.lora_A.weight": _z(4, 8), "unet.a.to_q.lora_B.weight": _z(8, 4, 3, 3)},
               name="y.safetensors")
    with pytest.raises(FormatError, match="A/B shape mismatch"):
        lora_merge.load(p)


def test_up_without_down(tmp_path):
    p = _write(tmp_path, {**_kohya_pair("lora_unet_b_to_k"), "lora_unet_a_to_q.lora_up.weight": _z(8, 2)})
    with pytest.raises(FormatError, match=r"lora_unet_a_to_q: up \(B\) weight without a down \(A\) weight"):
        lora_merge.load(p)
    p = _write(tmp_path, {"unet.x.lora_A.weight": _z(2, 4)}, name="z.safetensors")
    with pytest.raises(FormatError, match=r"down \(A\) weight without an up \(B\)"):
        lora_merge.load(p)


def test_bad_alpha(tmp_path):
    t = {**_kohya_pair("lora_unet_a_to_q"), "lora_unet_a_to_q.alpha": torch.tensor([1.0, 2.0])}
    with pytest.raises(FormatError, match="alpha must be a single number"):
        lora_merge.load(_write(tmp_path, t))
    t["lora_unet_a_to_q.alpha"] = torch.tensor(float("nan"))
    with pytest.raises(FormatError, match="alpha is nan"):
        lora_merge.load(_write(tmp_path, t, name="n.safetensors"))


def test_no_lora_keys(tmp_path):
    p = _write(tmp_path, {"model.layer.weight": _z(2, 2)})
    with pytest.raises(FormatError, match="no LoRA keys found"):
        lora_merge.load(p)


def test_missing_paths(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        lora_merge.load(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="not a PEFT adapter folder"):
        lora_merge.load(tmp_path / "empty")


def test_bad_peft_config(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    _write(d, {"base_model.model.a.lora_A.weight": _z(2, 4), "base_model.model.a.lora_B.weight": _z(4, 2)},
           name="adapter_model.safetensors")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="adapter_config.json is not valid JSON"):
        lora_merge.load(d)


def test_unparsed_keys_warn_or_fail_with_strict(tmp_path):
    p = _write(tmp_path, {**_kohya_pair("lora_unet_a_to_q"), "lora_unet_a_to_q.something_else": _z(1),
                          "text_model.foo": _z(1)})
    with pytest.warns(PartialReadWarning, match=r"2 keys not understood as kohya LoRA and skipped: "
                                                r"lora_unet_a_to_q\.something_else, text_model\.foo"):
        ad = lora_merge.load(p)
    assert ad.unparsed_keys == ["lora_unet_a_to_q.something_else", "text_model.foo"] and len(ad) == 1
    with pytest.raises(FormatError, match="2 keys not understood"):
        lora_merge.load(p, strict=True)


def test_pickle_refused_unless_allowed(tmp_path):
    p = tmp_path / "x.bin"
    torch.save({"lora_unet_a_to_q.lora_down.weight": torch.randn(2, 4),
                "lora_unet_a_to_q.lora_up.weight": torch.randn(4, 2),
                "lora_unet_a_to_q.alpha": torch.tensor(1.0)}, p)
    for suffix in (".bin", ".pt", ".ckpt", ".pth"):
        q = p.with_suffix(suffix)
        q.write_bytes(p.read_bytes())
        with pytest.raises(FormatError, match=r"pickle file; refused .*allow_pickle=True"):
            lora_merge.load(q)
    ad = lora_merge.load(p, allow_pickle=True)
    assert ad.dialect == "kohya" and ad["unet.a.to_q"].scale == 0.5


def test_pickle_with_code_is_not_executed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"a": Evil()}))
    with pytest.raises(FormatError, match="weights_only"):
        lora_merge.load(p, allow_pickle=True)


def test_peft_folder_with_pickle_weights(tmp_path):
    d = tmp_path / "ad"
    d.mkdir()
    torch.save({"base_model.model.a.lora_A.weight": torch.randn(2, 4),
                "base_model.model.a.lora_B.weight": torch.randn(4, 2)}, d / "adapter_model.bin")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    with pytest.raises(FormatError, match="refused"):
        lora_merge.load(d)
    assert lora_merge.load(d, allow_pickle=True)["a"].scale == 2.0


def test_unknown_format_option():
    with pytest.raises(lora_merge.UsageError, match="unknown format"):
        lora_merge.load(shared_fixture("sd15/pokemon_style.safetensors"), format="comfy")


def test_tensor_read_errors_are_format_errors(tmp_path):
    p = _write(tmp_path, {"unet.a.to_q.lora_A.weight": _z(2, 4), "unet.a.to_q.lora_B.weight": _z(4, 2)})
    ad = lora_merge.load(p)  # header only: the file is not opened for tensors yet
    p.unlink()
    with pytest.raises(FormatError, match="cannot read tensor 'unet.a.to_q.lora_A.weight'"):
        next(iter(ad)).factors()
