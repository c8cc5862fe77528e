"""FLUX.1: its two module layouts and the exact conversions between them.

* **native** (Black Forest Labs' original model; what kohya sd-scripts / musubi-tuner and ComfyUI files
  name): ``transformer.double_blocks.N.img_attn.qkv`` (q, k and v **fused** in one module),
  ``…single_blocks.N.linear1`` (q, k, v and the MLP input fused), ``…img_in``, ``…final_layer.linear`` …
* **diffusers** (``FluxTransformer2DModel``; diffusers and PEFT files):
  ``transformer.transformer_blocks.N.attn.to_q`` / ``to_k`` / ``to_v``,
  ``…single_transformer_blocks.N.attn.to_q`` … ``proj_mlp``, ``…x_embedder``, ``…proj_out`` …

Splitting a fused module is exact: every part keeps the shared down matrix A and takes its rows of the up
matrix B.  Fusing is exact too: a group whose parts share one A (what a split wrote) becomes one module
with the up matrices stacked; otherwise the downs are stacked, the ups placed block-diagonally and the
ranks summed.  ``final_layer.adaLN_modulation.1`` and ``norm_out.linear`` order their output halves
differently (shift/scale vs scale/shift, as diffusers' converters note); the up rows are swapped.
"""
from __future__ import annotations

import re

import torch

from .. import arch
from ..adapter import Adapter, LoraModule
from ..errors import FormatError
from .layout import DerivedRef, Layout, register_layout

__all__ = ["DIFFUSERS_SUFFIXES", "NATIVE_HEADS", "diffusers_to_native", "native_to_diffusers", "to_diffusers",
           "to_native"]

P = "transformer."
#: native double-block module → its diffusers modules (several: fused, in row order)
DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SWAPPED = "final_layer.adaLN_modulation.1"
#: first path components of native Flux names (after ``transformer.``)
NATIVE_HEADS = frozenset({"double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in",
                          "guidance_in", "final_layer"})
#: the relative output sizes of the parts of a fused module, in units of the hidden size (MLP ratio 4)
PART_UNITS = {"img_attn.qkv": (1, 1, 1), "txt_attn.qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)}
DIFFUSERS_SUFFIXES = frozenset(s for parts in (*DOUBLE.values(), *SINGLE.values()) for s in parts)

_NATIVE_RX = re.compile(r"^transformer\.(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFF_RX = re.compile(r"^transformer\.(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_TOP_BACK = {v: k for k, v in TOP.items()}
_DOUBLE_BACK = {d: (n, i, len(ps)) for n, ps in DOUBLE.items() for i, d in enumerate(ps)}
_SINGLE_BACK = {d: (n, i, len(ps)) for n, ps in SINGLE.items() for i, d in enumerate(ps)}


def native_to_diffusers(name: str) -> tuple[str, ...] | None:
    """``transformer.double_blocks.3.img_attn.qkv`` → its diffusers module names (None if not native)."""
    m = _NATIVE_RX.match(name)
    if m:
        table = DOUBLE if m.group(1) == "double_blocks" else SINGLE
        head = "transformer_blocks" if m.group(1) == "double_blocks" else "single_transformer_blocks"
        parts = table.get(m.group(3))
        return None if parts is None else tuple(f"{P}{head}.{m.group(2)}.{p}" for p in parts)
    if name.startswith(P) and name[len(P):] in TOP:
        return (P + TOP[name[len(P):]],)
    return None


def diffusers_to_native(name: str) -> tuple[str, int, int] | None:
    """A diffusers Flux module → ``(native module, part index, number of parts)`` (None if not one)."""
    m = _DIFF_RX.match(name)
    if m:
        table = _DOUBLE_BACK if m.group(1) == "transformer_blocks" else _SINGLE_BACK
        head = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
        hit = table.get(m.group(3))
        return None if hit is None else (f"{P}{head}.{m.group(2)}.{hit[0]}", hit[1], hit[2])
    if name.startswith(P) and name[len(P):] in _TOP_BACK:
        return (P + _TOP_BACK[name[len(P):]], 0, 1)
    return None


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1] if name.endswith(("qkv", "linear1")) else ""


def _units(native: str) -> tuple[int, ...]:
    m = _NATIVE_RX.match(native)
    return PART_UNITS.get(m.group(3), (1,)) if m else (1,)


def is_native(name: str) -> bool:
    return name.startswith(P) and name[len(P):].split(".", 1)[0] in NATIVE_HEADS


def is_diffusers_flux(name: str) -> bool:
    return diffusers_to_native(name) is not None


# ---------------------------------------------------------------- split (native → diffusers)
def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _renamed(m: LoraModule, name: str, swap: bool) -> LoraModule:
    up = m.up
    if swap:
        if up.shape[0] % 2:
            raise FormatError(f"module {m.source_key or m.name}: {up.shape[0]} output rows do not split into "
                              "shift and scale halves", None)
        src = m.up
        up = DerivedRef(src.shape, src.dtype, lambda: _swap_halves(src.load()), src)
    bias = m.bias
    if swap and bias is not None:
        bsrc = bias
        bias = DerivedRef(bsrc.shape, bsrc.dtype, lambda: _swap_halves(bsrc.load()), bsrc)
    return LoraModule(name=name, down=m.down, up=up, alpha=m.alpha, scale_rule=m.scale_rule,
                      source_key=m.source_key, bias=bias)


def split_module(m: LoraModule, where=None) -> list[LoraModule]:
    """The diffusers modules of one native module: renamed, or for a fused one sliced (exact)."""
    targets = native_to_diffusers(m.name)
    if targets is None:
        return [m]
    if len(targets) == 1:
        return [_renamed(m, targets[0], m.name.endswith(SWAPPED))]
    h = int(m.down.shape[1])
    units = _units(m.name)
    sizes = [u * h for u in units]
    rows = int(m.up.shape[0])
    if len(m.up.shape) != 2 or rows != sum(sizes):
        what = "q, k, v" if len(units) == 3 else "q, k, v and the MLP input"
        raise FormatError(f"module {m.source_key or m.name}: fused up matrix has {rows} rows, expected "
                          f"{sum(units)}·{h} = {sum(sizes)} ({what} of hidden size {h}); it does not split",
                          where)
    out, start = [], 0
    src = m.up
    for t, n in zip(targets, sizes):
        up = DerivedRef((n, src.shape[1]), src.dtype, lambda s=start, n=n: src.load()[s:s + n], src)
        bias = None
        if m.bias is not None:  # the bias delta is sliced like the up matrix's rows
            b = m.bias
            bias = DerivedRef((n,), b.dtype, lambda s=start, n=n, b=b: b.load()[s:s + n], b)
        out.append(LoraModule(name=t, down=m.down, up=up, alpha=m.alpha, scale_rule=m.scale_rule,
                              source_key=m.source_key, bias=bias))
        start += n
    return out


def to_diffusers(adapter: Adapter) -> Adapter:
    """The adapter with every native Flux module in the diffusers layout (fused ones split exactly)."""
    mods: dict[str, LoraModule] = {}
    for m in adapter:
        for part in split_module(m, adapter.source):
            if part.name in mods:
                raise FormatError(f"module {part.name} is in the file twice (as {mods[part.name].source_key} "
                                  f"and {part.source_key})", adapter.source)
            mods[part.name] = part
    return _with_modules(adapter, mods)


# ---------------------------------------------------------------- fuse (diffusers → native)
def _fused(native: str, parts: list[LoraModule | None], where) -> LoraModule:
    present = [p for p in parts if p is not None]
    h = int(present[0].down.shape[1])
    sizes = [u * h for u in _units(native)]
    for p, n in zip(parts, sizes):
        if p is None:
            continue
        if len(p.down.shape) != 2 or int(p.down.shape[1]) != h or p.out_features != n:
            raise FormatError(f"module {p.source_key or p.name}: weight {p.out_features}×{p.in_features} does "
                              f"not fit {native} (parts of {h} inputs and {sizes} outputs); cannot fuse", where)
    dtype = present[0].dtype
    bias = _fused_bias(parts, sizes)
    scales = {p.scale for p in present}
    if len(present) == len(parts) and len({p.rank for p in present}) == 1 and len(scales) == 1 and all(
            p.dtype == dtype and p.scale_rule == present[0].scale_rule for p in present):
        a0 = present[0].down.load()
        if all(p.down is present[0].down or torch.equal(p.down.load(), a0) for p in present[1:]):
            ups = [p.up for p in present]  # one shared down (what a split wrote): stack the ups
            up = DerivedRef((sum(sizes), present[0].rank), dtype, lambda: torch.cat([u.load() for u in ups]),
                            ups[0])
            return LoraModule(native, present[0].down, up, present[0].alpha, present[0].scale_rule,
                              present[0].source_key, bias)
    ranks = [p.rank for p in present]
    total = sum(ranks)
    same_scale = len(scales) == 1
    work = dtype if same_scale and all(p.dtype == dtype for p in present) else torch.float32

    def down_fn():
        return torch.cat([p.down.load(work) for p in present], dim=0)

    def up_fn():
        up = torch.zeros(sum(sizes), total, dtype=work)
        row = col = 0
        for p, n in zip(parts, sizes):
            if p is not None:
                b = p.up.load(work)
                if not same_scale:
                    b = b * p.scale
                up[row:row + n, col:col + p.rank] = b
                col += p.rank
            row += n
        return up

    down = DerivedRef((total, h), work, down_fn, present[0].down)
    up = DerivedRef((sum(sizes), total), work, up_fn, present[0].up)
    alpha = present[0].scale * total if same_scale else float(total)
    return LoraModule(native, down, up, alpha, "standard", present[0].source_key, bias)


def _fused_bias(parts: list[LoraModule | None], sizes: list[int]) -> DerivedRef | None:
    """The fused module's bias delta: the parts' stacked (zeros for a part without one), or None."""
    have = [p.bias for p in parts if p is not None and p.bias is not None]
    if not have:
        return None

    def fn():
        return torch.cat([p.bias.load(torch.float32).reshape(-1) if p is not None and p.bias is not None
                          else torch.zeros(n) for p, n in zip(parts, sizes)])
    return DerivedRef((sum(sizes),), torch.float32, fn, have[0])


def to_native(adapter: Adapter) -> Adapter:
    """The adapter with every diffusers Flux module in the native layout (q/k/v and linear1 fused)."""
    groups: dict[str, list[LoraModule | None]] = {}
    order: list[tuple[str, LoraModule | None]] = []
    for m in adapter:
        hit = diffusers_to_native(m.name)
        if hit is None:
            order.append((m.name, m))
            continue
        native, i, n = hit
        if native not in groups:
            groups[native] = [None] * n
            order.append((native, None))
        if groups[native][i] is not None:
            raise FormatError(f"module {m.name} is in the file twice", adapter.source)
        groups[native][i] = m
    mods: dict[str, LoraModule] = {}
    for name, m in order:
        if m is None:
            parts = groups[name]
            if len(parts) == 1:
                p = parts[0]
                m = _renamed(p, name, name.endswith(SWAPPED))
            else:
                m = _fused(name, parts, adapter.source)
        if name in mods:
            raise FormatError(f"module {name} is in the file twice (native and diffusers names)", adapter.source)
        mods[name] = m
    return _with_modules(adapter, mods)


def _with_modules(adapter: Adapter, mods: dict[str, LoraModule]) -> Adapter:
    return Adapter(modules=mods, extra_tensors=dict(adapter.extra_tensors), metadata=dict(adapter.metadata),
                   dialect=adapter.dialect, dialect_variant=adapter.dialect_variant, source=adapter.source,
                   config=adapter.config, unparsed_keys=list(adapter.unparsed_keys))


# ---------------------------------------------------------------- detection
def which_layout(adapter: Adapter) -> str | None:
    """``"native"``, ``"diffusers"``, ``"mixed"`` or None (no Flux module names at all)."""
    nat = any(is_native(n) for n in adapter.modules)
    dif = any(n.startswith(P + "single_transformer_blocks.") for n in adapter.modules) or (
        arch.guess_arch(adapter) == "flux" and any(is_diffusers_flux(n) for n in adapter.modules))
    if nat and dif:
        return "mixed"
    return "native" if nat else "diffusers" if dif else None


def _claims(adapter: Adapter) -> str | None:
    return which_layout(adapter)


LAYOUT = register_layout(Layout(
    family="flux", detect=_claims, to_native=to_native, to_diffusers=to_diffusers,
    describe={"native": "native (BFL) names, fused img/txt qkv and single-block linear1",
              "diffusers": "diffusers names, split to_q / to_k / to_v",
              "mixed": "both native (fused) and diffusers (split) names"}))
