"""A fuzz campaign against the command line: hostile and corrupted inputs through inspect, convert, merge,
diff and priors, each run in a forked child of one warm process (the fork server: torch is imported once,
a case costs a fork instead of an interpreter start), with a time limit.

    python benchmarks/fuzz_campaign.py --cases 3000 --seed 2026 --jobs 2

Every case makes its inputs in a fresh folder (a mutation of a real fixture from ../shared/fixtures when
present, of a small synthetic adapter, or of a small synthetic LoRA of one of the model families), hashes
them, runs one command in-process (``lora_merge.cli.main``) and classifies the outcome:

- ``clean error``: exit code 1-4, one ``error: …`` line on stderr (warning lines allowed), no output;
- ``success``: exit code 0 (a written output is read back: a NaN/Inf in it counts as ``non-finite output``);
- ``traceback``: a Python traceback or a message that is not one line; ``crash``: killed by a signal;
- ``hang``: still running after ``--timeout`` seconds;
- ``partial output``: an output or a temporary file left after an error (or a temporary file after success);
- ``input modified``: any input file's bytes changed;
- ``special file replaced``: a FIFO, device node, socket, folder or symlink the case put where an output
  goes is not the same kind of file afterwards (``os.lstat``).

A drawn case is one of five scenarios (``SCENARIOS``): ``classic`` (header, byte, value, cost, FIFO and
PEFT-config mutations, 15% of them with a hostile output place), ``arch`` (``--arch NAME`` forced, NAME
every registered family or none, mostly on the family LoRAs; ``convert`` has no ``--arch``, so there it
is ``--to`` every dialect it writes), ``recipe`` (``merge --config FILE`` with wrongly typed, badly
encoded, huge or special recipe files), ``range`` (values finite in their dtype that overflow or
underflow on a cast or a product) and ``special-out`` (the output, report, sidecar or priors file a FIFO,
a device node made in the case's own folder, a symlink to one, a socket, a folder, a trailing ``/``,
with and without ``--force``; a merge with no ``-o``, a ``--dry-run``).  After the drawn cases comes
``arch-matrix`` (``--no-matrix`` skips it): every family LoRA x every registered family name x inspect
(plain, ``--json``, ``--modules``) and merge, and x every ``convert --to`` dialect.  Some cases carry an
expectation (a clean error, exit 2, nothing written): a case that meets its outcome class but not its
expectation is listed as ``unmet`` and fails the run.

The table of outcomes per command is printed at the end (``--json`` for a machine-readable copy); the
failing cases are listed with their mutation, and ``--keep DIR`` keeps their folders.  Every file the
campaign makes lives in the temporary folder it creates.  The mutations (``mutate``, ``prepare``) and the
outcome check (``classify``, ``judge``) are shared with ``tests/test_fuzz_cli.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
SD15 = ["pokemon_style", "rick_and_morty_style", "course3_unet_prefixed", "sd_lora_2100"]
PEFT = ["distilbert_emotion", "distilbert_imdb", "gpt2_tigrinya"]

#: command -> the group it counts for in the table
COMMANDS = {
    "inspect": "inspect", "inspect-modules": "inspect", "inspect-json": "inspect",
    "convert": "convert", "convert-peft": "convert",
    "merge": "merge", "merge-rank": "merge", "merge-ties": "merge", "merge-dare": "merge",
    "merge-svd": "merge", "merge-ziplora": "merge", "merge-report": "merge",
    "diff": "diff",
    "priors": "priors",
}
#: commands that take seconds on a real fixture (dense ΔW per layer): mostly given the small adapters
SLOW_ON_FIXTURES = ("diff", "inspect-modules", "merge-ziplora", "merge-ties", "merge-dare", "merge-svd", "merge-rank")
OUTCOMES = ["clean error", "success", "traceback", "crash", "hang", "partial output", "input modified",
            "non-finite output", "special file replaced"]
BAD = ["traceback", "crash", "hang", "partial output", "input modified", "non-finite output", "special file replaced"]
#: the groups a scenario applies to, and its weight there (the rest of a group's cases are ``classic``)
SCENARIOS = {
    "arch": {"inspect": 0.2, "merge": 0.15, "convert": 0.15, "priors": 0.1},
    "recipe": {"merge": 0.15},
    "range": {"inspect": 0.2, "merge": 0.12, "convert": 0.17, "diff": 0.25, "priors": 0.1},
    "special-out": {"merge": 0.13, "convert": 0.18, "priors": 0.1},
}
DIALECTS = ["kohya", "diffusers", "peft", "comfyui", "lycoris", "xlabs"]


# ---------------------------------------------------------------- safetensors bytes
def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict | str, body: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    blob = text.encode("utf-8", "surrogatepass")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + body


def tensor_keys(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _np_dtype(tag: str):
    import numpy as np

    return {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I32": np.int32, "I64": np.int64,
            "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_, "I16": np.int16}.get(tag)


def tensors_of(data: bytes) -> tuple[dict, dict]:
    """(name -> numpy array, metadata) of a safetensors file (BF16 kept as raw uint16)."""
    import numpy as np

    header, body = split(data)
    md = header.pop("__metadata__", {}) or {}
    out = {}
    for k, v in header.items():
        b, e = v["data_offsets"]
        dt = _np_dtype(v["dtype"]) or np.uint16
        out[k] = (v["dtype"], np.frombuffer(body[b:e], dtype=dt).reshape(v["shape"]).copy())
    return out, md


def build(tensors: dict, metadata: dict | None) -> bytes:
    """Bytes of a safetensors file from ``name -> (tag, numpy array)``."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    chunks, off = [], 0
    for k in sorted(tensors):
        tag, arr = tensors[k]
        raw = arr.tobytes()
        header[k] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    return join(header, b"".join(chunks))


# ---------------------------------------------------------------- base inputs
@dataclass
class Base:
    name: str
    path: Path  # a .safetensors file or a PEFT folder
    peft: bool = False
    big: bool = False  # a real fixture (slower commands)
    family: str = ""  # the model family a synthetic family LoRA is detected as


def synthetic(folder: Path) -> list[Base]:
    """Small adapters in three dialects (kohya with alphas and a conv, diffusers fp16, PEFT with a head)."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    t = {}
    for i, blk in enumerate(["down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                             "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
                             "mid_block_attentions_0_proj_in", "up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"]):
        k = f"lora_unet_{blk}"
        t[f"{k}.lora_down.weight"] = ("F32", rng.standard_normal((4, 32 + 8 * i)).astype(np.float32))
        t[f"{k}.lora_up.weight"] = ("F32", rng.standard_normal((24, 4)).astype(np.float32) * 0.1)
        t[f"{k}.alpha"] = ("F32", np.array(2.0, dtype=np.float32))
    k = "lora_unet_down_blocks_0_resnets_0_conv1"
    t[f"{k}.lora_down.weight"] = ("F32", rng.standard_normal((4, 8, 3, 3)).astype(np.float32))
    t[f"{k}.lora_up.weight"] = ("F32", rng.standard_normal((8, 4, 1, 1)).astype(np.float32))
    p = folder / "kohya.safetensors"
    p.write_bytes(build(t, {"ss_network_dim": "4", "ss_network_alpha": "2"}))
    out.append(Base("kohya", p))
    t = {}
    for i in range(4):
        m = f"unet.down_blocks.1.attentions.0.transformer_blocks.{i}.attn1.to_v"
        t[f"{m}.lora_A.weight"] = ("F16", rng.standard_normal((4, 40)).astype(np.float16))
        t[f"{m}.lora_B.weight"] = ("F16", (rng.standard_normal((40, 4)) * 0.1).astype(np.float16))
    p = folder / "diffusers.safetensors"
    p.write_bytes(build(t, {}))
    out.append(Base("diffusers", p))
    d = folder / "peft"
    d.mkdir(exist_ok=True)
    t = {}
    for i in range(3):
        m = f"base_model.model.encoder.layer.{i}.attention.q_lin"
        t[f"{m}.lora_A.weight"] = ("F32", rng.standard_normal((4, 32)).astype(np.float32))
        t[f"{m}.lora_B.weight"] = ("F32", rng.standard_normal((32, 4)).astype(np.float32) * 0.1)
    t["base_model.model.classifier.modules_to_save.default.weight"] = ("F32", rng.standard_normal((3, 32)).astype(np.float32))
    (d / "adapter_model.safetensors").write_bytes(build(t, {"format": "pt"}))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_lin"], "modules_to_save": ["classifier"],
        "alpha_pattern": {}, "rank_pattern": {}, "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "base_model_name_or_path": "distilbert-base-uncased", "task_type": "SEQ_CLS"}, indent=2))
    out.append(Base("peft-synthetic", d, peft=True))
    return out


def _kohya_key(p: str) -> tuple[str, str, str]:
    k = "lora_unet_" + p.replace(".", "_")
    return f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"


def _comfy_key(p: str) -> tuple[str, str, str]:
    return f"diffusion_model.{p}.lora_down.weight", f"diffusion_model.{p}.lora_up.weight", f"diffusion_model.{p}.alpha"


def _comfy_dot_key(p: str) -> tuple[str, str, str]:  # ".lora.down": the form ComfyUI's Z-Image files use
    return f"diffusion_model.{p}.lora.down.weight", f"diffusion_model.{p}.lora.up.weight", f"diffusion_model.{p}.alpha"


def _diffusers_key(p: str) -> tuple[str, str, None]:
    return f"transformer.{p}.lora_A.weight", f"transformer.{p}.lora_B.weight", None


_H = 16  # hidden size of the DiT families' LoRAs (shape-based detection only needs the ratios)
#: name -> (family it is detected as, key form, dtype, {module: (out, in)}): the smallest LoRA of each family
#: with the names and shape ratios its detection rule and layout (fused qkv, linear1 …) read
FAMILY_SPECS = {
    "sd15-kohya": ("sd1", _kohya_key, "F32", {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320)}),
    "sd21-kohya": ("sd2", _kohya_key, "F32", {
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 1024),
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0": (640, 640)}),
    "sdxl-kohya": ("sdxl", _kohya_key, "F16", {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 2048),
        "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_q": (64, 64)}),
    "flux-native": ("flux", _kohya_key, "F32", {
        "double_blocks.0.img_attn.qkv": (3 * _H, _H), "double_blocks.0.img_attn.proj": (_H, _H),
        "double_blocks.0.txt_attn.qkv": (3 * _H, _H), "double_blocks.0.img_mlp.0": (4 * _H, _H),
        "single_blocks.0.linear1": (7 * _H, _H), "single_blocks.0.linear2": (_H, 5 * _H)}),
    "flux-diffusers": ("flux", _diffusers_key, "F32", {
        "transformer_blocks.0.attn.to_q": (_H, _H), "transformer_blocks.0.attn.to_k": (_H, _H),
        "transformer_blocks.0.attn.to_v": (_H, _H), "transformer_blocks.0.attn.add_k_proj": (_H, _H),
        "single_transformer_blocks.0.attn.to_q": (_H, _H), "single_transformer_blocks.0.proj_mlp": (4 * _H, _H)}),
    "sd3": ("sd3", _comfy_key, "F32", {
        "joint_blocks.0.x_block.attn.qkv": (3 * _H, _H), "joint_blocks.0.x_block.attn.proj": (_H, _H),
        "joint_blocks.0.context_block.attn.qkv": (3 * _H, _H), "joint_blocks.0.x_block.mlp.fc1": (4 * _H, _H)}),
    "z-image": ("z-image", _comfy_dot_key, "F32", {
        "layers.0.attention.qkv": (3 * _H, _H), "layers.0.attention.out": (_H, _H),
        "noise_refiner.0.attention.qkv": (3 * _H, _H), "layers.0.feed_forward.w1": (4 * _H, _H)}),
    "wan": ("wan", _kohya_key, "F16", {
        "blocks.0.self_attn.q": (_H, _H), "blocks.0.cross_attn.k": (_H, _H), "blocks.0.ffn.0": (4 * _H, _H)}),
    "qwen-image": ("qwen-image", _diffusers_key, "BF16", {
        "transformer_blocks.0.attn.to_q": (_H, _H), "transformer_blocks.0.attn.add_k_proj": (_H, _H),
        "transformer_blocks.0.img_mlp.net.0.proj": (4 * _H, _H), "transformer_blocks.0.txt_mod.1": (6 * _H, _H)}),
    "flux2": ("flux2", _kohya_key, "F32", {
        "double_blocks.0.img_attn.qkv": (3 * _H, _H), "double_blocks.0.img_mlp.0": (6 * _H, _H),
        "single_blocks.0.linear1": (9 * _H, _H), "single_blocks.0.linear2": (_H, 4 * _H),
        "double_stream_modulation_img.lin": (6 * _H, _H)}),
}


def _as_dtype(tag: str, arr):
    """``(tag, array)`` of a float32 array in dtype ``tag`` (BF16 as its raw uint16 bits, rounded to nearest)."""
    import numpy as np

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if tag == "BF16":
        bits = arr.view(np.uint32).astype(np.uint64)
        return tag, (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF).astype(np.uint16)
    return tag, arr.astype(_np_dtype(tag))


def family_bases(folder: Path, rank: int = 2) -> list[Base]:
    """One small LoRA per model family (:data:`FAMILY_SPECS`): SD 1.5, SD 2.1 and SDXL kohya, FLUX.1 native and
    diffusers, SD3 (ComfyUI MMDiT names), Z-Image (ComfyUI, fused qkv), Wan (musubi kohya), Qwen-Image
    (diffusers, bf16) and FLUX.2 (native, SwiGLU shapes)."""
    import numpy as np

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, (family, key, tag, shapes) in FAMILY_SPECS.items():
        t = {}
        for module, (o, i) in shapes.items():
            down, up, alpha = key(module)
            t[down] = _as_dtype(tag, rng.standard_normal((rank, i)) / i**0.5)
            t[up] = _as_dtype(tag, rng.standard_normal((o, rank)) * 0.1)
            if alpha:
                t[alpha] = _as_dtype(tag, np.array(float(rank)))
        p = folder / f"{name}.safetensors"
        p.write_bytes(build(t, {"ss_network_dim": str(rank)} if key is _kohya_key else {}))
        out.append(Base(name, p, family=family))
    return out


def bases(work: Path) -> list[Base]:
    out = synthetic(work / "synthetic") + family_bases(work / "families")
    if FIXTURES.is_dir():
        out += [Base(n, FIXTURES / "sd15" / f"{n}.safetensors", big=True) for n in SD15
                if (FIXTURES / "sd15" / f"{n}.safetensors").exists()]
        out += [Base(n, FIXTURES / "peft" / n, peft=True, big=True) for n in PEFT if (FIXTURES / "peft" / n).is_dir()]
    return out


# ---------------------------------------------------------------- mutations
WEIRD = [None, True, 0, -1, 1.5, "", "x", [], {}, [1, 2], {"a": 1}, 2**64, "F32 ", "f32", "F8_E4M3", "BOOL",
         "I64", "U8", float("nan")]


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


HEADER_KINDS = ["dtype", "shape", "offsets", "drop", "rename", "dup-key", "metadata", "entry", "toplevel", "nested",
                "shape-swap", "rank0"]
HEAVY_HEADER_KINDS = ["huge-name", "many-metadata", "big-metadata-value"]


def header_mutation(rng: random.Random, data: bytes, light: bool = False) -> tuple[bytes, str]:
    """One change to a safetensors file's header (its data left as it is); ``light``: none of the
    megabyte-sized ones."""
    header, body = split(data)
    keys = tensor_keys(header)
    k = _pick(rng, keys)
    kind = _pick(rng, HEADER_KINDS if light else HEADER_KINDS + HEAVY_HEADER_KINDS)
    if kind == "dtype":
        header[k]["dtype"] = _pick(rng, WEIRD)
    elif kind == "shape":
        header[k]["shape"] = _pick(rng, [[], [-1, 4], [2**40, 2**40], ["4"], [0, 5], [1.5], None, [4], [2**62],
                                         [*header[k]["shape"], 1], header[k]["shape"][::-1]])
    elif kind == "offsets":
        b, e = header[k]["data_offsets"]
        header[k]["data_offsets"] = _pick(rng, [[e, b], [0, 2**63], [-1, e], [str(b), e], [b], None, [b, e + 8],
                                                [b + 1, e + 1], [b, e, 0], [True, e]])
    elif kind == "drop":
        del header[k]
    elif kind == "rename":
        header[_pick(rng, ["", "x", k + ".extra", k.replace("down", "up"), k.replace("lora", "loha"),
                           "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a", "\u00e9\u4e2d.lora_down.weight",
                           k.replace(".weight", ""), "__metadata__x"])] = header.pop(k)
    elif kind == "dup-key":
        text = json.dumps(header, separators=(",", ":"))
        entry = json.dumps({k: header[k]}, separators=(",", ":"))[1:-1]
        text = "{" + entry + "," + text[1:]
        return join(text, body), f"header:{kind}"
    elif kind == "metadata":
        header["__metadata__"] = _pick(rng, [[], "x", {"a": 1}, {"a": None}, {"a": {"b": "c"}}, {1: "x"}, None])
    elif kind == "entry":
        header[k] = _pick(rng, [None, [], "x", 1, {"dtype": "F32"}, {"shape": [1]}])
    elif kind == "toplevel":
        return join(_pick(rng, ["[]", "null", "1", '"x"', "{", "{}", "{\"a\":" * 5000 + "1" + "}" * 5000]), body), \
            f"header:{kind}"
    elif kind == "huge-name":
        header["x" * rng.choice([10_000, 1_000_000, 10_000_000]) + ".lora_down.weight"] = header.pop(k)
    elif kind == "many-metadata":
        header["__metadata__"] = {f"key_{i}": "v" * 8 for i in range(rng.choice([10_000, 100_000]))}
    elif kind == "big-metadata-value":
        header["__metadata__"] = {"ss_tag_frequency": "x" * rng.choice([1_000_000, 20_000_000])}
    elif kind == "nested":
        header["__metadata__"] = {"modelspec.title": json.dumps([[[[]]]] * 1000)}
    elif kind == "shape-swap":
        other = _pick(rng, keys)
        header[k]["shape"], header[other]["shape"] = header[other]["shape"], header[k]["shape"]
    elif kind == "rank0":
        header[k]["shape"] = [0, *header[k]["shape"][1:]]
    return join(header, body), f"header:{kind}"


def byte_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    hl = 8 + struct.unpack("<Q", data[:8])[0]
    kind = _pick(rng, ["flip", "truncate", "length", "append", "splice", "empty", "zero-header"])
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(hl)] ^= rng.randint(1, 255)
    elif kind == "truncate":
        del b[rng.randrange(len(b)):]
    elif kind == "length":
        b[:8] = struct.pack("<Q", _pick(rng, [0, 1, 7, hl, hl - 9, 2**64 - 1, 2**40, rng.randrange(2**32)]))
    elif kind == "append":
        b += os.urandom(rng.randint(1, 64))
    elif kind == "splice":
        i = rng.randrange(8, hl)
        b[i:i] = _pick(rng, [b"\"", b"\\", b"}", b"{", b"\xff\xfe", b"\x00", b"NaN", b",\"a\":1"])
    elif kind == "empty":
        b = bytearray()
    else:
        b[8:hl] = b" " * (hl - 8)
    return bytes(b), f"bytes:{kind}"


def value_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """A change to the tensors: non-finite values, huge values, alphas, rank 0, broken pairs, dtypes."""
    import numpy as np

    tensors, md = tensors_of(data)
    keys = sorted(tensors)
    floats = [k for k in keys if tensors[k][0] in ("F32", "F16", "F64")]
    kind = _pick(rng, ["nan", "inf", "huge", "zeros", "alpha", "swap", "transpose", "rank0", "rank-mismatch",
                       "int-dtype", "extra-tensor", "drop-up", "f64", "scalar-factor", "empty-file"])
    k = _pick(rng, floats or keys)
    tag, arr = tensors[k]
    if kind in ("nan", "inf", "huge") and arr.size and tag in ("F32", "F16", "F64"):
        arr = arr.copy()
        big = {"F16": 6e4, "F32": 3e38, "F64": 1e300}[tag]
        arr.reshape(-1)[rng.randrange(arr.size)] = {"nan": np.nan, "inf": -np.inf, "huge": big}[kind]
        tensors[k] = (tag, arr)
    elif kind == "zeros":
        tensors[k] = (tag, np.zeros_like(arr))
    elif kind == "alpha":
        alphas = [a for a in keys if a.endswith(".alpha")] or [k.rsplit(".", 2)[0] + ".alpha"]
        a = _pick(rng, alphas)
        v = _pick(rng, [np.nan, np.inf, 0.0, -4.0, 1e30, None])
        tensors[a] = ("F32", np.array([1.0, 2.0], dtype=np.float32) if v is None else np.array(v, dtype=np.float32))
    elif kind == "swap":
        other = k.replace("down", "up") if "down" in k else k.replace("up", "down").replace("lora_B", "lora_A")
        if other in tensors:
            tensors[k], tensors[other] = tensors[other], tensors[k]
    elif kind == "transpose" and arr.ndim == 2:
        tensors[k] = (tag, np.ascontiguousarray(arr.T))
    elif kind in ("rank0", "rank-mismatch"):
        pairs = [(d, d.replace("lora_down", "lora_up").replace("lora_A", "lora_B")) for d in keys
                 if ("lora_down" in d or "lora_A" in d)]
        if pairs:
            d, u = _pick(rng, pairs)
            if u in tensors:
                r = 0 if kind == "rank0" else max(tensors[d][1].shape[0] - 1, 0)
                tensors[d] = (tensors[d][0], np.ascontiguousarray(tensors[d][1][:r]))
                if kind == "rank0":
                    tensors[u] = (tensors[u][0], np.ascontiguousarray(tensors[u][1][:, :0]))
    elif kind == "int-dtype":
        tensors[k] = ("I32", arr.astype(np.int32))
    elif kind == "extra-tensor":
        tensors["foo.bar.weight"] = ("F32", np.ones((3, 3), dtype=np.float32))
    elif kind == "drop-up":
        ups = [u for u in keys if "lora_up" in u or "lora_B" in u]
        if ups:
            del tensors[_pick(rng, ups)]
    elif kind == "f64":
        tensors[k] = ("F64", arr.astype(np.float64))
    elif kind == "scalar-factor":
        tensors[k] = (tag, np.array(1.0, dtype=arr.dtype))
    elif kind == "empty-file":
        tensors = {}
    return build(tensors, md), f"values:{kind}"


def cost_mutation(rng: random.Random, data: bytes, path: Path) -> str:
    """Inputs whose cost no real adapter has: many tensors, a huge declared tensor over a sparse file."""
    kind = _pick(rng, ["many-tensors", "sparse-huge"])
    if kind == "many-tensors":
        n = rng.choice([60_000, 200_000])
        header = {f"t{i}.lora_down.weight": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
        path.write_bytes(join(header, b"\x00" * n))
    else:
        size = rng.choice([20, 100]) * 2**30
        header = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight":
                  {"dtype": "F32", "shape": [4, size // 16], "data_offsets": [0, size // 4]},
                  "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight":
                  {"dtype": "F32", "shape": [size // 16, 4], "data_offsets": [size // 4, size // 2]}}
        blob = join(header, b"")
        with open(path, "wb") as f:
            f.write(blob)
            f.truncate(len(blob) + size // 2)
    return f"cost:{kind}"


PEFT_BAD = {
    "lora_alpha": [None, [8], "8", "NaN", -1, {"a": 1}, True],
    "r": [None, "8", 0, -4, 2.5, [4], True],
    "alpha_pattern": ["x", ["a"], {"(": 4}, {"q_lin": "b"}, {"q_lin": None}, 3],
    "rank_pattern": ["x", {"[": 4}, {"q_lin": 2.5}, {"q_lin": "4"}, []],
    "target_modules": ["(", ["(unclosed"], [1, 2], 5, {"a": 1}, "re:(", [None]],
    "modules_to_save": [[1], "x", {"a": 1}, [None], 7],
    "use_dora": ["false", "true", 1, None],
    "use_rslora": ["true", "no", 2, []],
    "peft_type": ["LOHA", 3, None, "lora", "IA3"],
    "fan_in_fan_out": ["no", 1, None],
    "task_type": [5, ["x"]],
}


def peft_mutation(rng: random.Random, folder: Path) -> str:
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    kind = _pick(rng, ["type", "type", "type", "dup-key", "not-object", "truncated", "config-dir", "no-weights",
                       "no-config", "nan-literal", "weights", "weights"])
    if kind == "type":
        key = _pick(rng, sorted(PEFT_BAD))
        val = _pick(rng, PEFT_BAD[key])
        cfg[key] = float("nan") if val == "NaN" and key == "lora_alpha" else val
        cfg_path.write_text(json.dumps(cfg))
        return f"peft:{key}={json.dumps(val)}"
    if kind == "dup-key":
        text = json.dumps(cfg)
        cfg_path.write_text('{"lora_alpha": 1, "r": 64, ' + text[1:])
    elif kind == "not-object":
        cfg_path.write_text(_pick(rng, ["[]", "null", "3", '"LORA"']))
    elif kind == "truncated":
        text = cfg_path.read_text()
        cfg_path.write_text(text[: rng.randrange(len(text))])
    elif kind == "config-dir":
        cfg_path.unlink()
        cfg_path.mkdir()
    elif kind == "no-weights":
        (folder / "adapter_model.safetensors").unlink()
    elif kind == "no-config":
        cfg_path.unlink()
    elif kind == "nan-literal":
        cfg_path.write_text(json.dumps({**cfg, "lora_alpha": float("inf")}))
    else:
        w = folder / "adapter_model.safetensors"
        data, sub = _pick(rng, [header_mutation, value_mutation, byte_mutation])(rng, w.read_bytes())
        w.write_bytes(data)
        return f"peft-weights:{sub}"
    return f"peft:{kind}"


def mutate(rng: random.Random, base: Base, folder: Path) -> tuple[Path, Path, str]:
    """Copy ``base`` into ``folder`` twice (``good`` untouched, ``bad`` mutated); returns
    ``(bad, good, description)``."""
    folder.mkdir(parents=True, exist_ok=True)
    if base.peft:
        bad, good = folder / "bad_adapter", folder / "good_adapter"
        shutil.copytree(base.path, bad)
        shutil.copytree(base.path, good)
        for p in (*bad.iterdir(), *good.iterdir()):
            p.chmod(0o644)
        return bad, good, peft_mutation(rng, bad)
    bad, good = folder / "bad.safetensors", folder / "good.safetensors"
    shutil.copyfile(base.path, good)
    good.chmod(0o644)
    data = base.path.read_bytes()
    r = rng.random()
    if r < 0.03:
        os.mkfifo(bad)
        return bad, good, "special:fifo"
    if r < 0.06:
        return bad, good, cost_mutation(rng, data, bad)
    fn = header_mutation if r < 0.45 else value_mutation if r < 0.8 else byte_mutation
    new, what = fn(rng, data)
    bad.write_bytes(new)
    return bad, good, what


def argv_for(command: str, bad: Path, good: Path, out: Path) -> tuple[list[str], Path | None]:
    """The command line for ``command`` on the mutated input, and the output it would write (or None)."""
    o = out / ("merged" if bad.is_dir() or bad.suffix != ".safetensors" else "merged.safetensors")
    if command == "inspect":
        return ["inspect", str(bad)], None
    if command == "inspect-modules":
        return ["inspect", "--modules", str(bad)], None
    if command == "inspect-json":
        return ["inspect", "--json", str(bad)], None
    if command == "convert":
        return ["convert", str(bad), str(out / "converted.safetensors"), "--to", "diffusers"], out / "converted.safetensors"
    if command == "convert-peft":
        return ["convert", str(bad), str(out / "converted"), "--to", "peft"], out / "converted"
    if command == "diff":
        return ["diff", str(good), str(bad)], None
    if command == "priors":
        return ["priors", str(bad), "--json"], None
    extra = {"merge": [], "merge-rank": ["--rank", "4"], "merge-ties": ["-s", "ties"], "merge-dare": ["-s", "dare"],
             "merge-svd": ["-s", "svd"], "merge-ziplora": ["-s", "ziplora", "--arch", "sdxl"],
             "merge-report": ["--report", str(out / "report.json")]}[command]
    return ["merge", str(bad), str(good), "-o", str(o), *extra], o


# ---------------------------------------------------------------- scenarios beyond the classic mutations
@dataclass
class Prepared:
    """One case ready to run: its command line, the output it would write, what was done to it, what it
    must end in besides a clean outcome (``expect``) and the special files it put in the way."""

    argv: list[str]
    output: Path | None
    mutation: str
    #: "" (any clean outcome), "error" (a clean error), "exit2" (a clean error with exit code 2) or
    #: "nothing" (no file written, whatever the exit code)
    expect: str = ""
    #: path -> :func:`file_kind` before the run, for every special file the case made
    specials: dict = field(default_factory=dict)


def file_kind(path: Path) -> str:
    """What ``path`` is, without following it (``os.lstat``): ``fifo``, ``chr``, ``sock``, ``dir``, ``file``,
    ``missing``, or ``link->`` and what the link points at (its target's kind)."""
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    m = st.st_mode
    if stat.S_ISLNK(m):
        target = os.readlink(path)
        return f"link->{target}:{file_kind(path.parent / target)}"
    return ("fifo" if stat.S_ISFIFO(m) else "chr" if stat.S_ISCHR(m) else "blk" if stat.S_ISBLK(m)
            else "sock" if stat.S_ISSOCK(m) else "dir" if stat.S_ISDIR(m) else "file" if stat.S_ISREG(m) else "?")


def make_special(kind: str, path: Path) -> None:
    """Make a special file at ``path`` (always inside a case's own folder): a FIFO, a character device
    node (1, 3: the null device's numbers, made here, never a real /dev path), a socket, a folder, or a
    relative symlink to a FIFO or node made next to it."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(path))
        finally:
            s.close()
    elif kind == "folder":
        path.mkdir()
    elif kind.startswith("link-"):
        target = path.with_name(f".target-of-{path.name}")
        make_special(kind[len("link-"):], target)
        os.symlink(target.name, path)
    else:
        raise ValueError(kind)


def _copy_inputs(base: Base, folder: Path, name: str = "bad") -> Path:
    """An unchanged copy of ``base`` in ``folder`` (``name.safetensors`` or the folder ``name_adapter``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if base.peft:
        dst = folder / f"{name}_adapter"
        shutil.copytree(base.path, dst)
        for p in dst.iterdir():
            p.chmod(0o644)
    else:
        dst = folder / f"{name}.safetensors"
        shutil.copyfile(base.path, dst)
        dst.chmod(0o644)
    return dst


def _inputs(rng: random.Random, base: Base, in_dir: Path, mutated: float) -> tuple[Path, Path, str]:
    """``(bad, good, what)``: with probability ``mutated`` a classic mutation (:func:`mutate`), else two
    unchanged copies."""
    if rng.random() < mutated:
        return mutate(rng, base, in_dir)
    return _copy_inputs(base, in_dir, "bad"), _copy_inputs(base, in_dir, "good"), "valid"


def _set_opt(argv: list[str], opt: str, value: str) -> None:
    if opt in argv:
        argv[argv.index(opt) + 1] = value
    else:
        argv += [opt, value]


BOGUS_ARCH = ["nope", "SDXL", "", " sd1", "3", "flux,sdxl", "z_image", "sd1/../sdxl", "b-lora", "\u00e9"]


def dialects(command: str = "convert") -> list[str]:
    """The dialects ``COMMAND --to`` accepts (its own choices: a value it refuses is a usage error, which is
    click's three-line message, not a finding), else :data:`DIALECTS`."""
    from lora_merge.cli import cli

    opt = next((p for p in cli.get_command(None, command).params if p.name == "to"), None)
    choices = list(getattr(getattr(opt, "type", None), "choices", ()) or ())
    return choices or DIALECTS


def arch_names() -> list[str]:
    from lora_merge import families

    return [f.name for f in families.all_families()]


def arch_case(rng: random.Random, command: str, base: Base, in_dir: Path, out_dir: Path,
              others: list[Base], light: bool = False) -> Prepared:
    """``--arch NAME`` forced (every registered family, and some names no family has) on a family's LoRA;
    merges sometimes mix two families; ``convert`` (which takes no ``--arch``) writes every dialect."""
    bad, good, what = _inputs(rng, base, in_dir, 0.0 if light else 0.2)
    group = COMMANDS[command]
    mixed = False
    if group == "merge" and others and rng.random() < 0.3:
        other = _pick(rng, others)
        good = _copy_inputs(other, in_dir, "other")
        what += f"+{other.name}"
        mixed = rng.random() < 0.5
    argv, output = argv_for(command, bad, good, out_dir)
    if mixed:
        argv.append("--allow-mixed-arch")
        what += "+allow-mixed"
    if group == "convert":
        to = "peft" if command == "convert-peft" else _pick(rng, dialects("convert"))
        if to == "peft" and command == "convert":
            output = out_dir / "converted"
            argv[2] = str(output)
        _set_opt(argv, "--to", to)
        return Prepared(argv, output, f"arch:{base.name}:{what}:--to={to}")
    name = _pick(rng, arch_names()) if rng.random() < 0.85 else _pick(rng, BOGUS_ARCH)
    _set_opt(argv, "--arch", name)
    if group == "merge" and rng.random() < 0.3:
        to = _pick(rng, dialects("merge"))
        _set_opt(argv, "--to", to)
        if to == "peft":
            output = out_dir / "merged"
            argv[argv.index("-o") + 1] = str(output)
        what += f":--to={to}"
    return Prepared(argv, output, f"arch:{base.name}:{what}:--arch={name!r}")


MATRIX_COMMANDS = ["inspect", "inspect-json", "inspect-modules", "merge"]


def matrix_case(command: str, base: Base, in_dir: Path, out_dir: Path, arg: str) -> Prepared:
    """The ``--arch`` cross product, case by case: ``arg`` is the family name forced (``convert``: the
    dialect written) on an unchanged family LoRA."""
    bad, good = _copy_inputs(base, in_dir, "bad"), _copy_inputs(base, in_dir, "good")
    argv, output = argv_for(command, bad, good, out_dir)
    if COMMANDS[command] == "convert":
        if arg == "peft":
            output = out_dir / "converted"
            argv[2] = str(output)
        _set_opt(argv, "--to", arg)
        return Prepared(argv, output, f"arch-matrix:{base.name}:--to={arg}")
    _set_opt(argv, "--arch", arg)
    return Prepared(argv, output, f"arch-matrix:{base.name}:--arch={arg}")


def matrix_specs(fams: list[Base]) -> list[tuple[str, Base, str]]:
    """``(command, base, arg)`` for every family LoRA × every registered family name × inspect (plain,
    ``--json``, ``--modules``) and merge, and every family LoRA × every dialect convert writes."""
    names = arch_names()
    out = [(c, b, n) for b in fams for n in names for c in MATRIX_COMMANDS]
    return out + [("convert", b, d) for b in fams for d in dialects("convert")]


# ---- recipe files
GARBAGE = [None, 0, -1, 3, 1.5, float("nan"), float("inf"), True, False, "", "x", " ", [], [1], ["a", "b"], {},
           {"a": 1}, [[[]]], {"a": {"b": [None]}}, 10**30, -(10**30), "\u00e9\u4e2d", "../x"]
#: garbage for the keys that name a file to write: no strings (a string is a valid path, and one relative to
#: the recipe's folder would write among the inputs)
NOT_PATHS = [g for g in GARBAGE if not isinstance(g, str)]
BAD_WEIGHTS = ["a,b", ["a", 1], [[1], 2], {"x": 1}, [float("nan"), 1], [float("inf"), 1], "1,,2", [], [1, 2, 3],
               [True, False], [1e308, 1e308], [-1, -1], [0, 0], "1;2", [None, 1], "", [1e-320, 1]]
BAD_LAYER_WEIGHTS = [{"(": 1}, [["x", [1, "a"]]], 5, ["noequals"], [[1, 2, 3]], {"a": None}, {"a": [1, 2, 3]},
                     ["re:(=1"], [["", 1]], {"*": float("nan")}, "up_blocks=0", [{"a": 1}]]
RECIPE_KEYS = ["rank", "seed", "threads", "device", "strategy", "to", "dtype", "arch", "keep_heads_from", "force",
               "full_rank", "record_paths", "allow_mixed_arch", "base_weights", "version", "report"]
#: a recipe mutation -> whether no recipe with it can be valid (the case must end in a clean error)
RECIPE_KINDS = {
    "entry-path": True, "entry": True, "inputs": True, "sha256": False, "entry-extra-key": True, "output": False,
    "weights": False, "params": False, "param-value": False, "top-param": False, "key": False,
    "layer-weights": False, "unknown-key": True, "nested": True,
    "latin1": True, "bom": False, "utf16": True, "utf32": True, "nul": False, "empty": True, "whitespace": True,
    "truncated": False, "huge-comment": False, "huge-string": False, "huge-list": False, "yaml-tag": True,
    "yaml-aliases": False, "binary": True, "fifo": True, "folder": True, "missing": True, "chardev": True,
    "link-fifo": True, "link-loop": True, "dangling-link": True, "trailing-slash": False, "wrong-ext": False,
    "socket": True,
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        if not -(2**63) <= v < 2**63:
            raise ValueError("TOML integers are 64-bit")
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ValueError(f"no TOML for {v!r}")


def dump_recipe(data: dict, fmt: str) -> str:
    """``data`` as a JSON, YAML or TOML recipe (TOML has no null: ``ValueError``)."""
    if fmt == "json":
        return json.dumps(data)
    if fmt == "toml":
        return "".join(f"{json.dumps(str(k))} = {_toml_value(v)}\n" for k, v in data.items())
    import yaml

    return yaml.safe_dump(data, allow_unicode=True)


def recipe_case(rng: random.Random, command: str, base: Base, in_dir: Path, out_dir: Path,
                light: bool = False) -> Prepared:
    """``merge --config FILE`` (the command's own flags kept) with a recipe naming the inputs and
    ``../out/…`` as output, then mutated: wrongly typed values anywhere, encodings, sizes, special paths."""
    bad, good, what = _inputs(rng, base, in_dir, 0.0 if light else 0.25)
    argv, output = argv_for(command, bad, good, out_dir)
    extra = argv[5:]
    data: dict = {"inputs": [bad.name, good.name], "output": os.path.relpath(output, in_dir)}
    if command == "merge-ties" or rng.random() < 0.2:
        data["strategy"] = _pick(rng, ["ties", "dare", "svd", "linear"])
        extra = [x for x in extra if x not in ("-s", "ties", "dare", "svd")]
    kind = _pick(rng, sorted(k for k in RECIPE_KINDS if not (light and k.startswith("huge"))))
    fmt = _pick(rng, ["json", "yaml", "toml"])
    g = _pick(rng, GARBAGE)
    detail = ""
    text: str | None = None
    raw: bytes | None = None
    special = ""
    if kind == "entry-path":
        data["inputs"][0] = {"path": g}
        detail = repr(g)
    elif kind == "entry":
        data["inputs"][0] = _pick(rng, [g for g in GARBAGE if not isinstance(g, str)])
        detail = repr(data["inputs"][0])
    elif kind == "inputs":
        data["inputs"] = _pick(rng, [g for g in GARBAGE if not isinstance(g, list)] + [[]])
        detail = repr(data["inputs"])
    elif kind == "sha256":
        data["inputs"][0] = {"path": bad.name, "sha256": _pick(rng, [*GARBAGE, "0" * 64, "zz", "ab" * 40])}
        detail = repr(data["inputs"][0]["sha256"])
    elif kind == "entry-extra-key":
        data["inputs"][1] = {"path": good.name, _pick(rng, ["x", "dialect2", "", "sha"]): 1}
    elif kind == "output":
        data["output"] = g = _pick(rng, NOT_PATHS)
        detail = repr(g)
    elif kind == "weights":
        data["weights"] = _pick(rng, BAD_WEIGHTS)
        detail = repr(data["weights"])
    elif kind == "params":
        data["params"] = _pick(rng, [g for g in GARBAGE if not isinstance(g, dict)] + [{"nope": 1}, {"": None}])
        detail = repr(data["params"])
    elif kind == "param-value":
        data["strategy"] = _pick(rng, ["ties", "dare", "svd", "ziplora", "np-lora", "magnitude-prune"])
        extra = [x for x in extra if x not in ("-s", "ties", "dare", "svd", "ziplora", "--arch", "sdxl")]
        p = _pick(rng, ["density", "energy", "k", "divide", "hard", "axis", "input_model", "steps", "lambda_cycle"])
        data["params"] = {p: g}
        detail = f"{data['strategy']}.{p}={g!r}"
    elif kind == "top-param":
        data["strategy"] = "ties"
        extra = [x for x in extra if x not in ("-s", "ties", "dare", "svd", "ziplora", "--arch", "sdxl")]
        data["density"] = g
        detail = repr(g)
    elif kind == "key":
        k = _pick(rng, RECIPE_KEYS)
        data[k] = g = _pick(rng, NOT_PATHS) if k == "report" else g
        detail = f"{k}={g!r}"
    elif kind == "layer-weights":
        data["layer_weights"] = _pick(rng, BAD_LAYER_WEIGHTS)
        detail = repr(data["layer_weights"])
    elif kind == "unknown-key":
        fmt = "yaml"
        text = dump_recipe(data, fmt) + _pick(rng, ["nope: 1\n", "1: 2\n", "~: 2\n", "[a]: 1\n", "? {a: 1}\n: 2\n",
                                                     "inputs_: []\n", "Inputs: []\n"])
    elif kind == "nested":
        depth = _pick(rng, [100, 1000] if light else [100, 1000, 100_000])
        k = _pick(rng, ["inputs", "weights", "params", "output", "layer_weights", "nope"])
        fmt = _pick(rng, ["json", "yaml"])
        opener, closer = ("[", "]") if k != "params" else ("{\"a\": ", "}")
        body = opener * depth + "1" + closer * depth
        text = json.dumps({kk: v for kk, v in data.items() if kk != k})[:-1] + f', "{k}": {body}}}'
        detail = f"{k}@{depth}"
    elif kind in ("latin1", "bom", "utf16", "utf32", "nul", "truncated"):
        t = dump_recipe(data, fmt)
        if kind == "latin1":
            raw = t.replace(bad.name, bad.name.replace("bad", "b\u00e9d")).encode("latin-1")
            if b"\xe9" not in raw:
                raw = b"\xe9" + raw
        elif kind == "bom":
            raw = b"\xef\xbb\xbf" + t.encode()
        elif kind == "utf16":
            raw = t.encode(_pick(rng, ["utf-16", "utf-16-le", "utf-16-be"]))
        elif kind == "utf32":
            raw = t.encode("utf-32")
        elif kind == "nul":
            i = rng.randrange(len(t) + 1)
            raw = t[:i].encode() + b"\x00" + t[i:].encode()
        else:
            raw = t.encode()[: rng.randrange(1, max(len(t), 2))]
    elif kind == "empty":
        raw = b""
    elif kind == "whitespace":
        raw = _pick(rng, [b"\n", b"   \n\t\n", b"# only a comment\n", b"---\n", b"...\n"])
    elif kind == "huge-comment":
        fmt = _pick(rng, ["yaml", "toml"])
        raw = dump_recipe(data, fmt).encode() + b"# " + b"x" * (5 << 20) + b"\n"
    elif kind == "huge-string":
        k = _pick(rng, ["output", "strategy", "arch", "device"])
        data[k] = "x" * _pick(rng, [5000, 1 << 20, 20 << 20])
        detail = f"{k}:{len(data[k])}"
    elif kind == "huge-list":
        data["weights"] = [0.5] * _pick(rng, [10_000, 200_000])
        detail = str(len(data["weights"]))
    elif kind == "yaml-tag":
        fmt = "yaml"
        text = dump_recipe(data, fmt) + _pick(rng, ["version: !!python/object/apply:os.getcwd []\n",
                                                     "rank: !!binary aGVsbG8=\n", "seed: !custom 3\n",
                                                     "output: !!set {a, b}\n", "rank: !!timestamp 2024-01-01\n"])
    elif kind == "yaml-aliases":  # nine levels of nine aliases: 9**9 items if anything expands them
        fmt = "yaml"
        key = _pick(rng, ["params", "weights", "version", "layer_weights", "inputs"])
        levels = ["&a0 [x, x, x, x, x, x, x, x, x]"]
        levels += [f"&a{i} [{', '.join(['*a' + str(i - 1)] * 9)}]" for i in range(1, 9)]
        bomb = "[" + ", ".join(levels) + "]"
        text = dump_recipe({k: v for k, v in data.items() if k != key}, "yaml") + (
            f"{key}: {{density: {bomb}}}\n" if key == "params" else f"{key}: {bomb}\n")
        detail = key
    elif kind == "binary":
        raw = base.path.read_bytes()[:4096] if base.path.is_file() else os.urandom(512)
    elif kind == "wrong-ext":
        fmt = _pick(rng, ["json", "yaml", "toml"])
        text = dump_recipe(data, fmt)
        ext = _pick(rng, [".txt", "", ".yml", ".JSON", ".toml" if fmt != "toml" else ".json", ".safetensors"])
        special = "ext:" + ext
    else:
        special = kind  # a path kind
    if special and not special.startswith("ext:"):
        path = in_dir / f"recipe.{fmt}"
        if kind == "missing":
            pass
        elif kind == "link-loop":
            os.symlink("recipe.b", in_dir / "recipe.a")
            os.symlink("recipe.a", in_dir / "recipe.b")
            path = in_dir / "recipe.a"
        elif kind == "dangling-link":
            os.symlink("no-such-recipe.yaml", path)
        elif kind == "trailing-slash":
            path.write_text(dump_recipe(data, "json"))
            argv = ["merge", "--config", str(path) + "/", *extra]  # read as the file (pathlib drops the '/')
            return Prepared(argv, output, f"recipe:{what}:{kind}")
        else:
            make_special({"fifo": "fifo", "chardev": "chardev", "link-fifo": "link-fifo", "folder": "folder",
                          "socket": "socket"}[kind], path)
        argv = ["merge", "--config", str(path), *extra]
        return Prepared(argv, output, f"recipe:{what}:{kind}", "error")
    if raw is None:
        if text is None:
            try:
                text = dump_recipe(data, fmt)
            except ValueError:  # TOML has no null, no big ints
                fmt = "yaml"
                text = dump_recipe(data, fmt)
        raw = text.encode("utf-8", "surrogatepass")
    ext = special[len("ext:"):] if special else f".{fmt}"
    path = in_dir / f"recipe{ext}"
    path.write_bytes(raw)
    argv = ["merge", "--config", str(path), *extra]
    if rng.random() < 0.1:  # flags override the recipe
        argv += ["-o", str(output)]
        what += "+o"
    return Prepared(argv, output, f"recipe:{what}:{kind}:{fmt}" + (f":{detail}"[:80] if detail else ""),
                    "error" if RECIPE_KINDS[kind] else "")


# ---- value ranges
RANGE_KINDS = ["f64-beyond-f32", "f64-all-beyond", "lora-product", "lora-product-f16", "lokr-product",
               "lokr-factored", "lokr-f64", "f16-max", "bf16-max", "alpha-product", "subnormal-f32", "subnormal-f16",
               "subnormal-f64", "underflow-product", "f64-mixed"]


def _pairs(tensors: dict) -> list[tuple[str, str, str]]:
    """``(module prefix, down key, up key)`` of every 2-D LoRA pair."""
    out = []
    for d in sorted(tensors):
        for a, b in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
                     (".lora.down.weight", ".lora.up.weight")):
            if d.endswith(a) and d[: -len(a)] + b in tensors and tensors[d][1].ndim == 2:
                out.append((d[: -len(a)], d, d[: -len(a)] + b))
    return out


def _smallest_factor(n: int) -> int:
    return next((f for f in range(2, int(n**0.5) + 1) if n % f == 0), max(1, n))


def range_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Values finite in their dtype that are not once cast or multiplied: float64 beyond float32, factors
    whose product overflows (LoRA, LoKr), fp16/bf16 maxima, subnormals and products that underflow."""
    import numpy as np

    tensors, md = tensors_of(data)
    pairs = _pairs(tensors)
    floats = [k for k in sorted(tensors) if tensors[k][0] in ("F32", "F16", "F64", "BF16")
              and not k.endswith(".alpha") and tensors[k][1].size]
    kind = _pick(rng, RANGE_KINDS)
    if not pairs or not floats:
        return build(tensors, md), f"range:{kind}:nothing"
    prefix, d, u = _pick(rng, pairs)
    exp = rng.randint(39, 300)

    def f32(k):
        tag, arr = tensors[k]
        if tag == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32)

    detail = ""
    if kind == "f64-beyond-f32":
        k = _pick(rng, floats)
        arr = f32(k).astype(np.float64)
        arr.reshape(-1)[rng.randrange(arr.size)] = _pick(rng, [1, -1]) * 10.0**exp
        tensors[k] = ("F64", arr)
        detail = f"1e{exp}"
    elif kind == "f64-all-beyond":
        tensors[d] = ("F64", f32(d).astype(np.float64) * 10.0**exp)
        detail = f"1e{exp}"
    elif kind == "f64-mixed":  # one factor tiny, one huge: the product is fine in float64, not both casts
        tensors[d] = ("F64", f32(d).astype(np.float64) * 10.0**exp)
        tensors[u] = ("F64", f32(u).astype(np.float64) * 10.0**-exp)
        detail = f"1e{exp}/1e-{exp}"
    elif kind in ("lora-product", "lora-product-f16"):
        e = _pick(rng, [19, 20, 25, 30, 37])
        tag = "F32" if kind == "lora-product" else "F16"
        v = 10.0**e if tag == "F32" else 6e4
        for k in (d, u):
            sign = np.sign(f32(k))
            tensors[k] = (tag, (np.where(sign == 0, 1, sign) * v).astype(_np_dtype(tag)))
        detail = f"1e{e}" if tag == "F32" else "6e4"
    elif kind in ("lokr-product", "lokr-factored", "lokr-f64"):
        o, i = tensors[u][1].shape[0], tensors[d][1].shape[1]
        a, b = _smallest_factor(o), _smallest_factor(i)
        e = _pick(rng, [19, 20, 25]) if kind != "lokr-f64" else rng.randint(39, 200)
        tag = "F64" if kind == "lokr-f64" else "F32"
        npd = _np_dtype(tag)
        for k in (d, u):
            del tensors[k]
        tensors.pop(prefix + ".alpha", None)
        tensors[prefix + ".lokr_w1"] = (tag, np.full((a, b), 10.0**e, dtype=npd))
        if kind == "lokr-factored":
            r = 2
            tensors[prefix + ".lokr_w2_a"] = (tag, np.full((o // a, r), 10.0**e, dtype=npd))
            tensors[prefix + ".lokr_w2_b"] = (tag, np.full((r, i // b), 10.0**e, dtype=npd))
            tensors[prefix + ".alpha"] = ("F32", np.array(float(r), dtype=np.float32))
        else:
            tensors[prefix + ".lokr_w2"] = (tag, np.full((o // a, i // b), 10.0**e, dtype=npd))
        detail = f"1e{e}:{a}x{b}"
    elif kind == "f16-max":
        for k in (d, u):
            tensors[k] = ("F16", np.full(tensors[k][1].shape, _pick(rng, [65504.0, -65504.0]), dtype=np.float16))
    elif kind == "bf16-max":
        for k in (d, u):
            tensors[k] = _as_dtype("BF16", np.full(tensors[k][1].shape, 3.38e38, dtype=np.float32))
    elif kind == "alpha-product":
        e = _pick(rng, [20, 30, 38])
        tensors[prefix + ".alpha"] = ("F32", np.array(10.0**e, dtype=np.float32))
        tensors[d] = ("F32", f32(d) * 1e10)
        detail = f"1e{e}"
    elif kind == "subnormal-f32":
        tensors[d] = ("F32", np.full(tensors[d][1].shape, 1e-42, dtype=np.float32))
    elif kind == "subnormal-f16":
        for k in (d, u):
            tensors[k] = ("F16", np.full(tensors[k][1].shape, 6e-8, dtype=np.float16))
    elif kind == "subnormal-f64":
        tensors[d] = ("F64", np.full(tensors[d][1].shape, _pick(rng, [1e-310, 1e-320, 1e-50])))
    else:  # underflow-product
        for k in (d, u):
            tensors[k] = ("F32", np.full(tensors[k][1].shape, 1e-25, dtype=np.float32))
    return build(tensors, md), f"range:{kind}" + (f":{detail}" if detail else "")


def range_case(rng: random.Random, command: str, base: Base, in_dir: Path, out_dir: Path) -> Prepared:
    """One :func:`range_mutation` of the input (a PEFT folder's weights file), and for convert and merge
    sometimes an output dtype (the cast) and ``--rank`` (which a LoKr input needs)."""
    if base.peft:
        bad = _copy_inputs(base, in_dir, "bad")
        good = _copy_inputs(base, in_dir, "good")
        w = bad / "adapter_model.safetensors"
        data, what = range_mutation(rng, w.read_bytes())
        w.write_bytes(data)
    else:
        good = _copy_inputs(base, in_dir, "good")
        bad = in_dir / "bad.safetensors"
        data, what = range_mutation(rng, base.path.read_bytes())
        bad.write_bytes(data)
    argv, output = argv_for(command, bad, good, out_dir)
    group = COMMANDS[command]
    if group in ("merge", "convert") and rng.random() < 0.6:
        dt = _pick(rng, ["fp16", "bf16", "fp32"])
        _set_opt(argv, "--dtype", dt)
        what += f":--dtype={dt}"
    if group in ("merge", "convert") and "lokr" in what and "--rank" not in argv and rng.random() < 0.7:
        argv += ["--rank", "2"]
        what += ":--rank=2"
    if command == "merge" and rng.random() < 0.3:
        argv[2] = argv[1]  # the mutated input twice: its values add up
        what += ":twice"
    return Prepared(argv, output, what)


# ---- special files where an output goes
SPECIAL_KINDS = ["fifo", "chardev", "link-chardev", "link-fifo", "socket", "folder", "folder-slash", "slash",
                 "chardev-slash", "inside-folder", "no-output", "no-output-dry-run", "dry-run"]
#: the kinds only a merge has (the last three)
MERGE_ONLY_KINDS = ("no-output", "no-output-dry-run", "dry-run")


def special_case(rng: random.Random, command: str, base: Base, in_dir: Path, out_dir: Path,
                 light: bool = False) -> Prepared:
    """A special file where the output (or the ``--report``, the mask sidecar, the priors ``--save`` file)
    goes, with and without ``--force``; or a merge without ``-o``."""
    bad, good, what = _inputs(rng, base, in_dir, 0.0 if light else 0.2)
    argv, output = argv_for(command, bad, good, out_dir)
    group = COMMANDS[command]
    kinds = SPECIAL_KINDS if group == "merge" else [k for k in SPECIAL_KINDS if k not in MERGE_ONLY_KINDS]
    kind = _pick(rng, kinds)
    if kind == "dry-run":  # -o (and --report) given: a dry run still writes nothing
        argv.append("--dry-run")
        return Prepared(argv, output, f"out-special:{what}:{kind}", "nothing")
    if kind.startswith("no-output"):
        i = argv.index("-o")
        del argv[i:i + 2]
        if kind.endswith("dry-run"):
            argv.append("--dry-run")
            return Prepared(argv, output, f"out-special:{what}:{kind}", "nothing")
        return Prepared(argv, output, f"out-special:{what}:{kind}", "exit2")
    if command == "priors":
        output = out_dir / "priors.json"
        argv += ["--save", str(output)]
    if group == "merge" and rng.random() < 0.2:  # a PEFT folder output
        output = out_dir / "merged"
        argv[argv.index("-o") + 1] = str(output)
        _set_opt(argv, "--to", "peft")
    folder_out = output is not None and output.suffix != ".safetensors" and command != "priors"
    target = output
    if command == "merge-report" and rng.random() < 0.5:
        target = Path(argv[argv.index("--report") + 1])
    elif command == "merge-ziplora" and rng.random() < 0.5:
        target = output.with_name(output.name + ".masks.safetensors")
    force = rng.random() < 0.5
    if force:
        argv.append("--force")
    expect = "error"
    specials: dict = {}
    if kind == "inside-folder":
        # an output folder that exists, with a special file where one of its files goes
        folder = output if folder_out else out_dir / "dir.safetensors"
        folder.mkdir()
        inner = folder / _pick(rng, ["adapter_model.safetensors", "adapter_config.json"])
        make_special(_pick(rng, ["fifo", "chardev", "link-chardev", "folder", "socket"]), inner)
        specials[str(inner)] = file_kind(inner)
        if not folder_out:
            argv[argv.index(str(output))] = str(folder)
            target = folder
        return Prepared(argv, output, f"out-special:{what}:{kind}:{file_kind(inner)}{':force' if force else ''}",
                        "error", specials | {str(folder): "dir"})
    if str(target) not in argv and kind.endswith("slash"):  # the sidecar: a path the command line never names
        kind = _pick(rng, ["fifo", "chardev", "link-chardev", "link-fifo", "socket", "folder"])
    if kind in ("slash", "folder-slash", "chardev-slash"):
        i = argv.index(str(target))
        if kind == "folder-slash":
            make_special("folder", target)
        elif kind == "chardev-slash":
            make_special("chardev", target)
        if kind != "slash":
            specials[str(target)] = file_kind(target)
        argv[i] = str(target) + "/"
        if folder_out and kind != "chardev-slash" and target == output:
            expect = ""  # a folder output may be named with a '/'
    else:
        make_special(kind, target)
        specials[str(target)] = file_kind(target)
        if kind.startswith("link-"):
            node = target.with_name(f".target-of-{target.name}")
            specials[str(node)] = file_kind(node)
        if kind == "folder" and folder_out and target == output:
            expect = ""  # an existing (empty) folder where a PEFT folder goes: --force may write into it
    where = "" if target == output else ":" + ("report" if "report" in target.name else "sidecar")
    return Prepared(argv, output, f"out-special:{what}:{kind}{where}{':force' if force else ''}", expect, specials)


def prepare(rng: random.Random, scenario: str, command: str, base: Base, folder: Path,
            family: list[Base] | None = None, arg: str = "", light: bool = False) -> Prepared:
    """Make one case's inputs under ``folder/in`` (and whatever it puts in the way under ``folder/out``);
    ``light`` (the property test): the new scenarios on unchanged inputs, without the multi-megabyte recipes."""
    in_dir, out_dir = folder / "in", folder / "out"
    in_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(exist_ok=True)
    if scenario == "arch-matrix":
        return matrix_case(command, base, in_dir, out_dir, arg)
    if scenario == "arch":
        return arch_case(rng, command, base, in_dir, out_dir, family or [], light)
    if scenario == "recipe":
        return recipe_case(rng, command, base, in_dir, out_dir, light)
    if scenario == "range":
        return range_case(rng, command, base, in_dir, out_dir)
    if scenario == "special-out":
        return special_case(rng, command, base, in_dir, out_dir, light)
    bad, good, what = mutate(rng, base, in_dir)
    argv, output = argv_for(command, bad, good, out_dir)
    if rng.random() < 0.15:
        what += place_mutation(rng, argv, output, bad, out_dir)
    return Prepared(argv, output, what)


# ---------------------------------------------------------------- one case
def digest(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        for p in sorted([root] if not root.is_dir() else root.rglob("*")):
            if p.is_fifo():
                out[str(p)] = "fifo"
            elif p.is_file():
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        if f.tell() > 64 << 20:  # sparse giants: their size and first 64 MiB
                            h.update(str(os.path.getsize(p)).encode())
                            break
                out[str(p)] = h.hexdigest()
    return out


def run_in_process(argv: list[str]) -> tuple[int, str, str]:
    """``lora_merge.cli.main(argv)`` with stdout/stderr captured: ``(exit code, stdout, stderr)``."""
    import warnings

    from lora_merge.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("default")
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:  # noqa: BLE001 - what the campaign is looking for
            import traceback

            traceback.print_exc(file=err)
            code = 99
    return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()


def nonfinite_output(path: Path | None) -> bool:
    if path is None or not path.exists():
        return False
    import torch
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return any(not bool(torch.isfinite(t).all()) for f in files for t in load_file(str(f)).values()
               if t.is_floating_point())


def place_mutation(rng: random.Random, argv: list[str], output: Path | None, bad: Path, out_dir: Path) -> str:
    """Point a writing command's output somewhere it must not write, or cannot (the inputs stay valid)."""
    if output is None:
        return ""
    i = argv.index(str(output))
    kind = _pick(rng, ["missing-folder", "parent-is-file", "exists", "exists-force", "onto-input",
                       "onto-input-force", "config-is-folder", "output-is-folder"])
    if kind == "missing-folder":
        argv[i] = str(out_dir / "no" / "such" / output.name)
    elif kind == "parent-is-file":
        (out_dir / "plain").write_text("x")
        argv[i] = str(out_dir / "plain" / output.name)
    elif kind in ("exists", "exists-force"):
        output.mkdir() if output.suffix != ".safetensors" else output.write_bytes(b"keep me")
        if output.is_dir():
            (output / "adapter_model.safetensors").write_bytes(b"keep me")
        if kind == "exists-force":
            argv.append("--force")
    elif kind.startswith("onto-input"):
        argv[i] = str(bad)
        if kind.endswith("force"):
            argv.append("--force")
    elif kind == "config-is-folder":
        argv[i] = str(out_dir / "peft_out")
        (out_dir / "peft_out" / "adapter_config.json").mkdir(parents=True)
        argv += ["--force"] + (["--to", "peft"] if argv[0] == "merge" else [])
        if argv[0] == "convert":
            argv[argv.index("--to") + 1] = "peft"
    else:
        (out_dir / "dir.safetensors").mkdir()
        argv[i] = str(out_dir / "dir.safetensors")
        argv.append("--force")
    return f"+out:{kind}"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file's digest and every folder under ``folder``: what a failed command must leave as it was."""
    return digest([folder]) | {str(p): "dir" for p in folder.rglob("*") if p.is_dir()}


def classify(code: int, err: str, output: Path | None, out_dir: Path, inputs_before: dict, inputs_after: dict,
             nonfinite: bool = False, out_before: dict | None = None, specials: dict | None = None) -> str:
    """``out_before``: :func:`snapshot` of ``out_dir`` before the run (None: it was empty); ``specials``:
    path -> :func:`file_kind` before the run of the special files the case put in the way."""
    temps = [p for p in out_dir.parent.rglob("*") if p.name.endswith(".tmp") and p.name.startswith(".")]
    if inputs_before != inputs_after:
        return "input modified"
    if any(file_kind(Path(p)) != kind for p, kind in (specials or {}).items()):
        return "special file replaced"
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    if "Traceback" in err or code == 99:
        return "traceback"
    if code == 0:
        if temps:
            return "partial output"
        return "non-finite output" if nonfinite else "success"
    if temps or snapshot(out_dir) != (out_before or {}):
        return "partial output"
    if code in (1, 2, 3, 4) and len(lines) == 1 and lines[0].startswith("error: "):
        return "clean error"
    return "traceback"  # a messy message counts as one


def judge(prep: Prepared, code: int, err: str, out_dir: Path, inputs_before: dict, inputs_after: dict,
          nonfinite: bool, out_before: dict) -> tuple[str, str]:
    """``(outcome, unmet)``: :func:`classify`'s outcome, and what a clean outcome fell short of the case's
    expectation in ("" when it met it)."""
    outcome = classify(code, err, prep.output, out_dir, inputs_before, inputs_after, nonfinite, out_before,
                       prep.specials)
    unmet = ""
    if outcome in ("clean error", "success"):
        if prep.expect == "error" and outcome != "clean error":
            unmet = "expected a clean error, got success"
        elif prep.expect == "exit2" and (outcome != "clean error" or code != 2):
            unmet = f"expected a clean error with exit code 2, got exit {code}"
        elif prep.expect == "nothing" and snapshot(out_dir) != out_before:
            unmet = "expected nothing written"
    return outcome, unmet


@dataclass
class Case:
    index: int
    command: str
    base: str
    mutation: str = ""
    outcome: str = ""
    seconds: float = 0.0
    detail: str = ""
    scenario: str = "classic"
    unmet: str = ""
    arg: str = ""  # arch-matrix: the family name (convert: the dialect)


#: the family LoRAs (set in the fork server before the first fork; ``arch`` cases mix them)
FAMILY_BASES: list[Base] = []


def run_prepared(prep: Prepared, folder: Path, on_start=None) -> tuple[str, str, int, str, float]:
    """Run a case :func:`prepare` made under ``folder`` and judge it: ``(outcome, unmet, exit code,
    stderr, seconds)``; ``on_start()`` is called just before the command runs."""
    out_dir = folder / "out"
    out_before = snapshot(out_dir)
    if on_start:
        on_start()
    before = digest([folder / "in"])
    t0 = time.perf_counter()
    code, _, err = run_in_process(prep.argv)
    seconds = time.perf_counter() - t0
    nonfinite = False
    if code == 0:
        try:
            nonfinite = nonfinite_output(prep.output)
        except Exception:  # noqa: BLE001 - an unreadable output is a finding too
            nonfinite = True
    outcome, unmet = judge(prep, code, err, out_dir, before, digest([folder / "in"]), nonfinite, out_before)
    return outcome, unmet, code, err, seconds


def child(case: Case, base: Base, seed: int, folder: Path, result: Path) -> None:
    """Runs in the forked child: make the inputs, run the command, write the outcome as JSON."""
    rng = random.Random(f"{seed}:{case.index}")
    result.write_text(json.dumps({**case.__dict__, "outcome": "running"}))
    prep = prepare(rng, case.scenario, case.command, base, folder, FAMILY_BASES, case.arg)
    case.mutation = prep.mutation

    def started():  # what a hang or crash was doing
        result.write_text(json.dumps({**case.__dict__, "outcome": "running"}))

    case.outcome, case.unmet, code, err, case.seconds = run_prepared(prep, folder, started)
    case.detail = f"exit {code}: " + " | ".join(err.strip().splitlines()[-3:])[:300]
    result.write_text(json.dumps(case.__dict__))


def _scenario(rng: random.Random, command: str) -> str:
    r, acc = rng.random(), 0.0
    for name, groups in SCENARIOS.items():
        acc += groups.get(COMMANDS[command], 0.0)
        if r < acc:
            return name
    return "classic"


def run_campaign(n: int, seed: int, jobs: int, timeout: float, keep: Path | None, only: list[str] | None,
                 scenarios: list[str] | None = None, matrix: bool = True) -> list[Case]:
    """``n`` random cases, then (``matrix``) the ``--arch`` cross product of :func:`matrix_specs`."""
    import torch

    torch.set_num_threads(1)  # the fork server stays single-threaded: forking after OpenMP started is unsafe
    from lora_merge.cli import COMMANDS as CLI_COMMANDS
    from lora_merge.cli import cli

    for name in CLI_COMMANDS:  # import every command module (and torch, safetensors …) once, before forking
        cli.get_command(None, name)
    import lora_merge.analysis
    import lora_merge.engine  # noqa: F401
    from lora_merge import families

    families.all_families()  # every family module imported before forking
    work = Path(tempfile.mkdtemp(prefix="lora-fuzz-"))
    all_bases = bases(work)
    FAMILY_BASES[:] = [b for b in all_bases if b.family]
    small = [b for b in all_bases if not b.big]
    commands = only or list(COMMANDS)
    if scenarios:
        commands = [c for c in commands if any(x == "classic" or SCENARIOS[x].get(COMMANDS[c]) for x in scenarios)]
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        b = _pick(rng, all_bases)
        cmd = _pick(rng, commands)
        if b.big and cmd in SLOW_ON_FIXTURES and rng.random() < 0.8:
            b = _pick(rng, [x for x in all_bases if not x.big and x.peft == b.peft] or all_bases)
        if scenarios:
            allowed = [x for x in scenarios if x == "classic" or SCENARIOS[x].get(COMMANDS[cmd])]
            scenario = _pick(rng, allowed) if allowed else "classic"
        else:
            scenario = _scenario(rng, cmd)
        if scenario == "arch" and rng.random() < 0.85:
            b = _pick(rng, FAMILY_BASES)
        elif scenario in ("recipe", "special-out") and b.big and rng.random() < 0.5:
            b = _pick(rng, small)
        cases.append((Case(i, cmd, b.name, scenario=scenario), b))
    if matrix and (not scenarios or "arch" in scenarios):
        specs = [(cmd, b, arg) for cmd, b, arg in matrix_specs(FAMILY_BASES) if not only or cmd in only]
        for j, (cmd, b, arg) in enumerate(specs):
            cases.append((Case(n + j, cmd, b.name, scenario="arch-matrix", arg=arg), b))
    n = len(cases)
    running: dict[int, tuple[Case, Path, float]] = {}
    done: list[Case] = []
    queue = list(cases)
    t_start = time.time()
    while queue or running:
        while queue and len(running) < jobs:
            case, base = queue.pop(0)
            folder = work / f"case{case.index:05d}"
            folder.mkdir()
            result = folder / "result.json"
            pid = os.fork()
            if pid == 0:  # the child
                code = 0
                try:
                    signal.signal(signal.SIGALRM, signal.SIG_DFL)
                    signal.alarm(math.ceil(timeout))
                    os.chdir(folder)
                    child(case, base, seed, folder, result)
                except BaseException:  # noqa: BLE001
                    import traceback

                    (folder / "child_error.txt").write_text(traceback.format_exc())
                    code = 1
                finally:
                    os._exit(code)
            running[pid] = (case, folder, time.time())
        pid, status = os.wait()
        if pid not in running:
            continue
        case, folder, t0 = running.pop(pid)
        result = folder / "result.json"
        record = json.loads(result.read_text()) if result.exists() else {}
        if record.get("outcome", "running") != "running":
            done.append(Case(**record))
        else:
            case.mutation = record.get("mutation", "")
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            case.seconds = time.time() - t0
            case.outcome = "hang" if sig == signal.SIGALRM else "crash"
            err = folder / "child_error.txt"
            case.detail = (f"signal {sig}" if sig else "") + (err.read_text()[-300:] if err.exists() else "")
            if case.outcome == "crash" and err.exists():
                case.outcome = "traceback"
            done.append(case)
        c = done[-1]
        if (c.outcome in BAD or c.unmet) and keep is not None:
            shutil.copytree(folder, keep / folder.name, symlinks=True, ignore_dangling_symlinks=True,
                            ignore=lambda d, names: [x for x in names if file_kind(Path(d) / x).split(":")[-1]
                                                     not in ("file", "dir")])
        _remove(folder)
        if len(done) % 250 == 0:
            print(f"  {len(done)}/{n} cases, {time.time() - t_start:.0f} s", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return sorted(done, key=lambda c: c.index)


def _remove(folder: Path) -> None:
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            p.chmod(0o755) if p.is_dir() else None
    shutil.rmtree(folder, ignore_errors=True)


def table(cases: list[Case], by: str = "command") -> str:
    """The outcome counts per command group (``by="command"``) or per scenario (``by="scenario"``)."""
    groups = defaultdict(Counter)
    for c in cases:
        groups[COMMANDS[c.command] if by == "command" else c.scenario][c.outcome] += 1
        groups["all"][c.outcome] += 1
    cols = [by, "cases", *OUTCOMES]
    rows = [cols, ["---"] * len(cols)]
    for g in [*sorted(k for k in groups if k != "all"), "all"]:
        cnt = groups[g]
        rows.append([g, str(sum(cnt.values())), *[str(cnt.get(o, 0)) for o in OUTCOMES]])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def mutation_family(c: Case) -> str:
    """The family a case's mutation belongs to (the first part of its description)."""
    if c.scenario != "classic":
        return c.scenario
    m = c.mutation or "?"
    return "PEFT weights" if m.startswith("peft-weights:") else "PEFT config" if m.startswith("peft:") else \
        {"header": "header", "bytes": "bytes", "values": "values", "cost": "cost", "special": "FIFO"}.get(
            m.split(":", 1)[0], m.split(":", 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="children at a time")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds before a case counts as a hang")
    ap.add_argument("--keep", type=Path, default=None, help="copy the folders of failing cases here")
    ap.add_argument("--only", nargs="*", default=None, choices=sorted(COMMANDS), help="only these commands")
    ap.add_argument("--scenario", nargs="*", default=None, choices=["classic", *SCENARIOS],
                    help="only these scenarios (default: all, in the proportions of SCENARIOS)")
    ap.add_argument("--no-matrix", dest="matrix", action="store_false",
                    help="skip the --arch cross product (every family LoRA x every family name) run after the cases")
    ap.add_argument("--json", type=Path, default=None, help="write every case's outcome here")
    a = ap.parse_args()
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cases = run_campaign(a.cases, a.seed, a.jobs, a.timeout, a.keep, a.only, a.scenario, a.matrix)
    wall = time.time() - t0
    print(table(cases))
    print()
    print(table(cases, by="scenario"))
    nm = sum(c.scenario == "arch-matrix" for c in cases)
    print(f"\n{len(cases)} cases ({len(cases) - nm} drawn, {nm} of the --arch matrix), seed {a.seed}, "
          f"{wall:.0f} s wall ({a.jobs} jobs), "
          f"fixtures {'used' if FIXTURES.is_dir() else 'absent'}")
    fams = Counter(mutation_family(c) for c in cases)
    print("mutation families: " + ", ".join(f"{k} {v}" for k, v in fams.most_common()))
    placed = sum("+out:" in c.mutation for c in cases)
    print(f"output-place mutations (classic): {placed}")
    no_o = [c for c in cases if c.mutation.endswith(":no-output")]
    dry = [c for c in cases if c.mutation.endswith((":no-output-dry-run", ":dry-run"))]
    print(f"merge without -o: {len(no_o)} cases, {sum(c.detail.startswith('exit 2:') and not c.unmet for c in no_o)} "
          f"clean errors with exit 2; with --dry-run (with and without -o): {len(dry)} cases "
          f"({sum(c.outcome == 'success' for c in dry)} successes, "
          f"{sum(c.outcome == 'clean error' for c in dry)} clean errors), "
          f"{sum(bool(c.unmet) for c in dry)} wrote a file")
    slow = sorted(cases, key=lambda c: -c.seconds)[:3]
    print("slowest: " + "; ".join(f"{c.command} {c.mutation} {c.seconds:.1f} s" for c in slow))
    bad = [c for c in cases if c.outcome in BAD]
    for c in bad[:80]:
        print(f"  [{c.outcome}] #{c.index} {c.command} on {c.base} ({c.mutation}): {c.detail}")
    unmet = [c for c in cases if c.unmet]
    for c in unmet[:40]:
        print(f"  [unmet: {c.unmet}] #{c.index} {c.command} on {c.base} ({c.mutation}): {c.detail}")
    if a.json:
        a.json.write_text(json.dumps([c.__dict__ for c in cases], indent=1))
    sys.exit(1 if bad or unmet else 0)


if __name__ == "__main__":
    main()
