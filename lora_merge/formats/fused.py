"""Exact conversion between a DiT family's native layout, with **fused** modules (q, k and v in one
``qkv`` Linear, Flux's ``linear1`` that also holds the MLP input), and diffusers' **split** layout.

A family describes itself once in a :class:`FusedLayout` (block tables, top-level renames, the relative
sizes of a fused module's parts, which modules order their output halves differently); the conversions
are written once here and used by :mod:`lora_merge.formats.flux` (FLUX.1) and
:mod:`lora_merge.formats.sd3` (SD3/3.5 MMDiT).

* **split** (native → diffusers): every part keeps the shared down matrix A and takes its rows of the up
  matrix B.  Same factors, same scale: bit-exact.
* **fuse** (diffusers → native): parts that share one A (what a split wrote) become one module with the up
  matrices stacked, rank unchanged; otherwise the downs are stacked, the ups placed block-diagonally and
  the ranks summed (a missing part is a zero block); differing scales are folded into B in fp32.
* **swapped halves**: an adaLN modulation whose output is (shift, scale) natively and (scale, shift) in
  diffusers (``final_layer.adaLN_modulation.1`` ↔ ``norm_out.linear``) has its up rows (and bias delta)
  swapped, as diffusers' checkpoint converters do.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..adapter import Adapter, LoraModule
from ..errors import FormatError
from .layout import DerivedRef

__all__ = ["FusedLayout"]

P = "transformer."


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


@dataclass(frozen=True)
class FusedLayout:
    """One family's native ↔ diffusers naming.

    ``blocks`` maps a native block list to ``(diffusers block list, {native suffix: diffusers suffixes})``
    (several suffixes = a fused module, in row order); ``top`` renames modules outside the blocks;
    ``units`` gives a fused module's part sizes in units of its input size; ``swaps(native_name, rows,
    in_features)`` says whether a module's output halves are swapped between the layouts."""

    family: str
    blocks: dict[str, tuple[str, dict[str, tuple[str, ...]]]]
    top: dict[str, str]
    units: dict[str, tuple[int, ...]]
    swaps: Callable[[str, int, int], bool]
    #: how the fused parts are described in error messages, by native suffix
    part_words: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        nat = "|".join(re.escape(b) for b in self.blocks)
        dif = "|".join(re.escape(d) for d, _ in self.blocks.values())
        object.__setattr__(self, "_native_rx", re.compile(rf"^transformer\.({nat})\.(\d+)\.(.+)$"))
        object.__setattr__(self, "_diff_rx", re.compile(rf"^transformer\.({dif})\.(\d+)\.(.+)$"))
        back = {d: (n, {s: (ns, i, len(ps)) for ns, ps in table.items() for i, s in enumerate(ps)})
                for n, (d, table) in self.blocks.items()}
        object.__setattr__(self, "_back", back)
        object.__setattr__(self, "_top_back", {v: k for k, v in self.top.items()})

    # ------------------------------------------------------------ names
    @property
    def native_heads(self) -> frozenset[str]:
        """First path components of native names (after ``transformer.``)."""
        return frozenset(self.blocks) | frozenset(k.split(".", 1)[0] for k in self.top)

    @property
    def diffusers_suffixes(self) -> frozenset[str]:
        return frozenset(s for _, table in self.blocks.values() for parts in table.values() for s in parts)

    def native_to_diffusers(self, name: str) -> tuple[str, ...] | None:
        """A native module → its diffusers module names (several for a fused one); None if not native."""
        m = self._native_rx.match(name)
        if m:
            head, table = self.blocks[m.group(1)]
            parts = table.get(m.group(3))
            return None if parts is None else tuple(f"{P}{head}.{m.group(2)}.{p}" for p in parts)
        if name.startswith(P) and name[len(P):] in self.top:
            return (P + self.top[name[len(P):]],)
        return None

    def diffusers_to_native(self, name: str) -> tuple[str, int, int] | None:
        """A diffusers module → ``(native module, part index, number of parts)``; None if not one."""
        m = self._diff_rx.match(name)
        if m:
            native_head, table = self._back[m.group(1)]
            hit = table.get(m.group(3))
            return None if hit is None else (f"{P}{native_head}.{m.group(2)}.{hit[0]}", hit[1], hit[2])
        if name.startswith(P) and name[len(P):] in self._top_back:
            return (P + self._top_back[name[len(P):]], 0, 1)
        return None

    def native_block(self, block: str) -> str | None:
        """``transformer.transformer_blocks.3`` (a diffusers block path) → its native path, or None."""
        head, _, i = block.removeprefix(P).rpartition(".")
        for native_head, (diff_head, _) in self.blocks.items():
            if head == diff_head:
                return f"{P}{native_head}.{i}"
        return None

    def is_native(self, name: str) -> bool:
        return self.native_to_diffusers(name) is not None

    def is_diffusers(self, name: str) -> bool:
        return self.diffusers_to_native(name) is not None

    def _units(self, native: str) -> tuple[int, ...]:
        m = self._native_rx.match(native)
        return self.units.get(m.group(3), (1,)) if m else (1,)

    # ------------------------------------------------------------ split (native → diffusers)
    def _renamed(self, m: LoraModule, name: str, native: str) -> LoraModule:
        up, bias = m.up, m.bias
        if self.swaps(native, int(up.shape[0]), int(m.down.shape[1])):
            if up.shape[0] % 2:
                raise FormatError(f"module {m.source_key or m.name}: {up.shape[0]} output rows do not split into "
                                  "shift and scale halves", None)
            src = m.up
            up = DerivedRef(src.shape, src.dtype, lambda: _swap_halves(src.load()), src)
            if bias is not None:
                bsrc = bias
                bias = DerivedRef(bsrc.shape, bsrc.dtype, lambda: _swap_halves(bsrc.load()), bsrc)
        return LoraModule(name=name, down=m.down, up=up, alpha=m.alpha, scale_rule=m.scale_rule,
                          source_key=m.source_key, bias=bias)

    def split_module(self, m: LoraModule, where=None) -> list[LoraModule]:
        """The diffusers modules of one native module: renamed, or for a fused one sliced (exact)."""
        targets = self.native_to_diffusers(m.name)
        if targets is None:
            return [m]
        if len(targets) == 1:
            return [self._renamed(m, targets[0], m.name)]
        h = int(m.down.shape[1])
        units = self._units(m.name)
        sizes = [u * h for u in units]
        rows = int(m.up.shape[0])
        if len(m.up.shape) != 2 or rows != sum(sizes):
            what = self.part_words.get(m.name.rsplit(".", 1)[-1], "q, k, v")
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

    def to_diffusers(self, adapter: Adapter) -> Adapter:
        """The adapter with every native module in the diffusers layout (fused ones split exactly)."""
        mods: dict[str, LoraModule] = {}
        for m in adapter:
            for part in self.split_module(m, adapter.source):
                if part.name in mods:
                    first = mods[part.name].source_key or mods[part.name].name
                    raise FormatError(f"module {part.name} is in the file twice (as {first} and "
                                      f"{part.source_key or m.name})", adapter.source)
                mods[part.name] = part
        return _with_modules(adapter, mods)

    # ------------------------------------------------------------ fuse (diffusers → native)
    def _fused(self, native: str, parts: list[LoraModule | None], where) -> LoraModule:
        present = [p for p in parts if p is not None]
        h = int(present[0].down.shape[1])
        sizes = [u * h for u in self._units(native)]
        for p, n in zip(parts, sizes):
            if p is None:
                continue
            if len(p.down.shape) != 2 or int(p.down.shape[1]) != h or p.out_features != n:
                raise FormatError(f"module {p.source_key or p.name}: weight {p.out_features}×{p.in_features} "
                                  f"does not fit {native} (parts of {h} inputs and {sizes} outputs); cannot fuse",
                                  where)
        dtype = present[0].dtype
        bias = _fused_bias(parts, sizes)
        scales = {p.scale for p in present}
        if len(present) == len(parts) and len({p.rank for p in present}) == 1 and len(scales) == 1 and all(
                p.dtype == dtype and p.scale_rule == present[0].scale_rule for p in present):
            a0 = present[0].down.load()
            if all(p.down is present[0].down or torch.equal(p.down.load(), a0) for p in present[1:]):
                ups = [p.up for p in present]  # one shared down (what a split wrote): stack the ups
                up = DerivedRef((sum(sizes), present[0].rank), dtype,
                                lambda: torch.cat([u.load() for u in ups]), ups[0])
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

    def to_native(self, adapter: Adapter) -> Adapter:
        """The adapter with every diffusers module in the native layout (split parts fused)."""
        groups: dict[str, list[LoraModule | None]] = {}
        order: list[tuple[str, LoraModule | None]] = []
        for m in adapter:
            hit = self.diffusers_to_native(m.name)
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
                m = self._renamed(parts[0], name, name) if len(parts) == 1 else self._fused(name, parts,
                                                                                           adapter.source)
            if name in mods:
                raise FormatError(f"module {name} is in the file twice (native and diffusers names)",
                                  adapter.source)
            mods[name] = m
        return _with_modules(adapter, mods)


def _fused_bias(parts: list[LoraModule | None], sizes: list[int]) -> DerivedRef | None:
    """The fused module's bias delta: the parts' stacked (zeros for a part without one), or None."""
    have = [p.bias for p in parts if p is not None and p.bias is not None]
    if not have:
        return None

    def fn():
        return torch.cat([p.bias.load(torch.float32).reshape(-1) if p is not None and p.bias is not None
                          else torch.zeros(n) for p, n in zip(parts, sizes)])
    return DerivedRef((sum(sizes),), torch.float32, fn, have[0])


def _with_modules(adapter: Adapter, mods: dict[str, LoraModule]) -> Adapter:
    return Adapter(modules=mods, extra_tensors=dict(adapter.extra_tensors), metadata=dict(adapter.metadata),
                   dialect=adapter.dialect, dialect_variant=adapter.dialect_variant, source=adapter.source,
                   config=adapter.config, unparsed_keys=list(adapter.unparsed_keys))
