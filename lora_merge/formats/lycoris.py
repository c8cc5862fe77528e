"""LyCORIS files: LoHa (``hada_w1_a/b``, ``hada_w2_a/b``, Tucker ``hada_t1/t2``), LoKr (``lokr_w1`` or
``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b``, Tucker ``lokr_t2``) and full-weight ``diff`` modules,
with their module names in the kohya (``lora_unet_…``), ComfyUI (``diffusion_model.…``) or diffusers
(``transformer.…``) form; plain ``lora_down``/``lora_up`` modules in the same file are read as LoRA.

ΔW, as LyCORIS, kohya's and ComfyUI's loaders compute it (``tests/test_lycoris.py`` checks it against
``lycoris-lora``'s own functions):

* LoHa: ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r`` with ``r = w1_b.shape[0]`` (each half rebuilt from
  its Tucker core when ``hada_t1``/``hada_t2`` are there); scale 1 without an alpha;
* LoKr: ``kron(w1, w2) · alpha / r`` with ``r`` the rank of the factored half (``w1_b`` first, else
  ``w2_b``); scale 1 when both halves are full or there is no alpha;
* ``diff``: ΔW itself.

Such a module is not a low-rank B·A.  It is held as a :class:`LycorisModule`: a :class:`LoraModule`
whose factors are the exact ΔW and an identity (rank ``min(d_out, d_in)``), computed one module at a
time when asked.  Writing it as a LoRA needs a rank: :func:`to_lora` re-factors every module to rank K and
reports the relative ΔW error; the merge engine re-factors merged layers to ``--rank``.  ``diff_b`` (bias
deltas) are read by :mod:`lora_merge.formats.bias`, DoRA by :mod:`lora_merge.formats.dora`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import linalg
from ..adapter import Adapter, LoraModule, TensorRef
from ..errors import FormatError, UsageError
from . import comfyui, names
from .common import make_module, read_scalar
from .layout import DerivedRef
from .registry import FileDialect, Located
from .safetensors_io import read_header

__all__ = ["DIALECT", "LycorisModule", "describe_cost", "has_lycoris", "is_lycoris_key", "needs_rank", "to_lora",
           "to_lora_for_output"]

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_PLAIN = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up"}
_SUFFIX = re.compile(r"^(?P<m>.+)\.(?P<s>" + "|".join((*LOHA, *LOKR, "diff", "alpha", *map(re.escape, _PLAIN)))
                     + r")$")
_LYCORIS_KEY = re.compile(r"\.(" + "|".join((*LOHA, *LOKR, "diff")) + r")$")


def is_lycoris_key(key: str) -> bool:
    return _LYCORIS_KEY.search(key) is not None


@dataclass
class LycorisModule(LoraModule):
    """A LoHa / LoKr / full-``diff`` module: ``delta()`` is its exact ΔW; ``factors()`` are that ΔW and an
    identity (so every strategy sees an exact, if full-rank, factorization)."""

    #: "LoHa", "LoKr", "full" or "DoRA" (made dense with the base weights: :mod:`lora_merge.formats.dora`)
    lycoris_type: str = "LoHa"
    #: the rank LyCORIS trained (``hada_w1_b.shape[0]``, the factored LoKr half's), None for full
    lycoris_rank: int | None = None
    parts: dict[str, TensorRef] = field(default_factory=dict)
    gamma: float = 1.0
    shape_of_weight: tuple[int, ...] = ()

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.parts.values()) + (self.bias.numel if self.bias is not None else 0)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.shape_of_weight

    def exact_delta(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """ΔW in the weight's shape."""
        p = {k: v.load(dtype, device) for k, v in self.parts.items()}
        if self.lycoris_type in ("full", "DoRA"):
            d = p["diff"]
        elif self.lycoris_type == "LoHa":
            d = _hada_half(p, 1) * _hada_half(p, 2)
        else:
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            w2 = _lokr_w2(p)
            while w1.dim() < w2.dim():
                w1 = w1.unsqueeze(-1)
            d = torch.kron(w1.contiguous(), w2.contiguous())
        d = d.reshape(self.shape_of_weight)
        d = d * self.gamma if self.gamma != 1.0 else d
        if d.is_floating_point() and not linalg.all_finite(d):  # finite factors whose product overflows
            handle = next((r.handle for r in self.parts.values() if r.handle is not None), None)
            raise FormatError(f"module {self.name}: its {self.lycoris_type} ΔW overflows "
                              f"{str(d.dtype).replace('torch.', '')} (±{torch.finfo(d.dtype).max:.3g}): the factors' "
                              "values are too large", handle.path if handle is not None else None)
        return d

    def delta(self, dtype: torch.dtype = torch.float32, device=None, flat: bool = True) -> torch.Tensor:
        d = self.exact_delta(dtype, device)
        return d.reshape(d.shape[0], -1) if flat else d


def _hada_half(p: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    a, b = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
    t = p.get(f"hada_t{i}")
    if t is not None:  # Tucker: a (r, out), b (r, in), t (r, r, kh, kw)
        return torch.einsum("i j ..., j r, i p -> p r ...", t, b, a)
    return (a @ b.reshape(b.shape[0], -1)).reshape(a.shape[0], *b.shape[1:])


def _lokr_w2(p: dict[str, torch.Tensor]) -> torch.Tensor:
    if "lokr_w2" in p:
        return p["lokr_w2"]
    a, b, t = p["lokr_w2_a"], p["lokr_w2_b"], p.get("lokr_t2")
    if t is not None:  # Tucker: a (r, c), b (r, d), t (r, r, kh, kw)
        return torch.einsum("i j ..., i p, j r -> p r ...", t, a, b)
    return (a @ b.reshape(b.shape[0], -1)).reshape(a.shape[0], *b.shape[1:])


# ---------------------------------------------------------------- shapes (header only)
def _bad(name: str, what: str, parts: dict[str, TensorRef], path) -> FormatError:
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(parts.items()))
    return FormatError(f"module {name}: {what} ({shapes})", path)


def _mm_shape(a, b, name, parts, path, what) -> tuple[int, ...]:
    if len(a) != 2 or len(b) < 2 or a[1] != b[0]:
        raise _bad(name, f"{what}: the two factors do not multiply", parts, path)
    return (a[0], *b[1:])


def _tucker_shape(t, a, b, name, parts, path, what) -> tuple[int, ...]:
    # (i j k…) with a (i p) and b (j r) → (p r k…)
    if len(t) < 3 or len(a) != 2 or len(b) != 2 or t[0] != a[0] or t[1] != b[0]:
        raise _bad(name, f"{what}: the Tucker core does not fit its factors", parts, path)
    return (a[1], b[1], *t[2:])


def _loha_shape(name, parts, path) -> tuple[tuple[int, ...], int]:
    need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    if not need <= set(parts):
        raise _bad(name, f"LoHa module without {', '.join(sorted(need - set(parts)))}", parts, path)
    s = {k: tuple(v.shape) for k, v in parts.items()}
    halves = []
    for i in (1, 2):
        a, b = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"]
        if f"hada_t{i}" in s:
            halves.append(_tucker_shape(s[f"hada_t{i}"], a, b, name, parts, path, f"LoHa half {i}"))
        else:
            halves.append(_mm_shape(a, b, name, parts, path, f"LoHa half {i}"))
    if halves[0] != halves[1]:
        raise _bad(name, f"inconsistent LoHa shapes: half 1 is {list(halves[0])}, half 2 {list(halves[1])}",
                   parts, path)
    return halves[0], int(s["hada_w1_b"][0])


def _lokr_shape(name, parts, path) -> tuple[tuple[int, ...], int | None]:
    s = {k: tuple(v.shape) for k, v in parts.items()}
    if "lokr_w1" in s:
        w1 = s["lokr_w1"]
        r1 = None
    elif {"lokr_w1_a", "lokr_w1_b"} <= set(s):
        w1, r1 = _mm_shape(s["lokr_w1_a"], s["lokr_w1_b"], name, parts, path, "LoKr w1"), s["lokr_w1_b"][0]
    else:
        raise _bad(name, "LoKr module without lokr_w1 or lokr_w1_a/lokr_w1_b", parts, path)
    if "lokr_w2" in s:
        w2, r2 = s["lokr_w2"], None
    elif {"lokr_w2_a", "lokr_w2_b"} <= set(s):
        if "lokr_t2" in s:
            w2 = _tucker_shape(s["lokr_t2"], s["lokr_w2_a"], s["lokr_w2_b"], name, parts, path, "LoKr w2")
        else:
            w2 = _mm_shape(s["lokr_w2_a"], s["lokr_w2_b"], name, parts, path, "LoKr w2")
        r2 = s["lokr_w2_b"][0]
    else:
        raise _bad(name, "LoKr module without lokr_w2 or lokr_w2_a/lokr_w2_b", parts, path)
    if len(w1) != 2 or len(w2) not in (2, 4):
        raise _bad(name, f"inconsistent LoKr shapes: w1 {list(w1)}, w2 {list(w2)}", parts, path)
    shape = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    return shape, (r1 if r1 is not None else r2)


def _structured(m: LycorisModule) -> tuple[int, object] | None:
    """``(rank, fn)`` of an exact low-rank factorization ``ΔW = up @ down`` (``fn() -> (up, down)``, scale
    folded in) read off the LoHa / LoKr structure of a linear module, or None:

    * LoHa: ``(A1 B1) ⊙ (A2 B2) = (A1 ⊙ᵣ A2)(B1 ⊙꜀ B2)`` (row-wise and column-wise Khatri–Rao products),
      rank ``r1·r2``;
    * LoKr: ``kron(w1, a2 b2) = kron(w1, a2) · kron(I_b, b2)``, rank ``b·r``; with a full ``w2``,
      ``kron(w1, w2) = kron(w1, I_c) · kron(I_b, w2)`` (rank ``b·c``) or ``kron(I_a, w2) · kron(w1, I_d)``
      (rank ``a·d``)."""
    if len(m.shape_of_weight) != 2 or m.lycoris_type not in ("LoHa", "LoKr") or any(
            k in m.parts for k in ("hada_t1", "hada_t2", "lokr_t2")):
        return None
    P, g = m.parts, m.gamma
    if m.lycoris_type == "LoHa":
        r = P["hada_w1_b"].shape[0] * P["hada_w2_b"].shape[0]

        def loha():
            a1, b1 = P["hada_w1_a"].load(torch.float32), P["hada_w1_b"].load(torch.float32)
            a2, b2 = P["hada_w2_a"].load(torch.float32), P["hada_w2_b"].load(torch.float32)
            up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1) * g
            down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
            return up, down
        return r, loha

    def w1():
        return P["lokr_w1"].load(torch.float32) if "lokr_w1" in P else \
            P["lokr_w1_a"].load(torch.float32) @ P["lokr_w1_b"].load(torch.float32)
    a = P["lokr_w1"].shape[0] if "lokr_w1" in P else P["lokr_w1_a"].shape[0]
    b = P["lokr_w1"].shape[1] if "lokr_w1" in P else P["lokr_w1_b"].shape[1]
    if "lokr_w2" not in P:
        r2 = P["lokr_w2_b"].shape[0]

        def lokr_factored():
            a2, b2 = P["lokr_w2_a"].load(torch.float32), P["lokr_w2_b"].load(torch.float32)
            return torch.kron(w1(), a2) * g, torch.kron(torch.eye(b), b2)
        return b * r2, lokr_factored
    c, d = P["lokr_w2"].shape

    def lokr_full():
        w2 = P["lokr_w2"].load(torch.float32)
        if b * c <= a * d:
            return torch.kron(w1(), torch.eye(c)) * g, torch.kron(torch.eye(b), w2)
        return torch.kron(torch.eye(a), w2) * g, torch.kron(w1(), torch.eye(d))
    return min(b * c, a * d), lokr_full


def _factor_refs(m: LycorisModule) -> tuple[TensorRef, TensorRef]:
    """(down, up) refs of an exact factorization ``ΔW = up @ down``: the LoHa/LoKr structure's when it is
    of lower rank (:func:`_structured`), else ΔW and an identity."""
    shape = m.shape_of_weight
    d_out, d_in = shape[0], math.prod(shape[1:])
    src = next(iter(m.parts.values()))
    conv = len(shape) == 4
    st = _structured(m)
    if st is not None and st[0] < min(d_out, d_in):
        r, fn = st
        cache: dict[str, torch.Tensor] = {}

        def part(i):
            if "f" not in cache or i in cache.get("used", set()):
                cache.clear()
                cache["f"] = fn()  # type: ignore[operator]
                cache["used"] = set()
            cache["used"].add(i)  # type: ignore[union-attr]
            return cache["f"][i]  # type: ignore[index]

        up = DerivedRef((d_out, r), torch.float32, lambda: part(0), src)
        down = DerivedRef((r, d_in), torch.float32, lambda: part(1), src)
        return down, up
    if d_out <= d_in:
        r = d_out
        down = DerivedRef((r, *shape[1:]) if conv else (r, d_in), torch.float32, lambda: m.exact_delta(), src)
        up = DerivedRef((d_out, r, 1, 1) if conv else (d_out, r), torch.float32,
                        lambda: torch.eye(r).reshape(d_out, r, *((1, 1) if conv else ())), src)
    else:
        r = d_in
        down = DerivedRef((r, *shape[1:]) if conv else (r, d_in), torch.float32,
                          lambda: torch.eye(r).reshape(r, *shape[1:]), src)
        up = DerivedRef((d_out, r, 1, 1) if conv else (d_out, r), torch.float32,
                        lambda: m.exact_delta().reshape(d_out, r, *((1, 1) if conv else ())), src)
    return down, up


def _module(name, src, parts, alpha, path) -> LoraModule:
    kinds = {"LoHa" if k.startswith("hada_") else "LoKr" if k.startswith("lokr_") else "full"
             for k in parts}
    if len(kinds) > 1:
        raise _bad(name, f"mixes {' and '.join(sorted(kinds))} tensors", parts, path)
    kind = kinds.pop()
    for k, v in parts.items():
        if not v.dtype.is_floating_point:
            raise _bad(name, f"{k} has non-float dtype {v.dtype}", parts, path)
    if kind == "LoHa":
        shape, r = _loha_shape(src, parts, path)
        gamma = alpha / r if alpha is not None else 1.0
    elif kind == "LoKr":
        shape, r = _lokr_shape(src, parts, path)
        gamma = alpha / r if alpha is not None and r is not None else 1.0
    else:
        shape, r, gamma = tuple(parts["diff"].shape), None, 1.0
        if len(shape) not in (2, 4):
            raise _bad(src, "diff is not a 2-D or 4-D weight", parts, path)
    if not math.isfinite(gamma):
        raise _bad(src, f"alpha {alpha} is not finite", parts, path)
    m = LycorisModule(name=name, down=None, up=None, alpha=None, source_key=src,  # type: ignore[arg-type]
                      lycoris_type=kind, lycoris_rank=r, parts=dict(parts), gamma=gamma,
                      shape_of_weight=tuple(int(x) for x in shape))
    m.down, m.up = _factor_refs(m)
    m.alpha = float(m.rank)  # scale 1: the identity factorization holds ΔW itself
    return m


# ---------------------------------------------------------------- the dialect
def _canonical(prefix: str) -> tuple[str, str] | None:
    """(canonical module name, naming form) of a key prefix."""
    if "." not in prefix:
        hit = names.kohya_to_canonical(prefix)
        return (hit[0], "kohya") if hit is not None else None
    parsed = comfyui._parse(prefix + ".alpha")
    if parsed is not None:
        return parsed[0], "comfyui"
    return prefix.removeprefix("base_model.model."), "diffusers"


def claims(key: str) -> bool:
    return is_lycoris_key(key)


def read(refs: dict[str, TensorRef], metadata: dict[str, str], path) -> Adapter:
    groups: dict[str, dict[str, tuple[str, TensorRef]]] = {}
    unparsed: list[str] = []
    for key, ref in refs.items():
        m = _SUFFIX.match(key)
        if m is None:
            unparsed.append(key)
            continue
        groups.setdefault(m.group("m"), {})[m.group("s")] = (key, ref)
    ad = Adapter(dialect="lycoris", metadata=dict(metadata))
    forms: dict[str, int] = {}
    types: dict[str, int] = {}
    for prefix, parts in groups.items():
        canon = _canonical(prefix)
        if canon is None or set(parts) == {"alpha"}:
            unparsed.extend(k for k, _ in parts.values())
            continue
        name, form = canon
        forms[form] = forms.get(form, 0) + 1
        alpha = read_scalar(parts["alpha"][1], path, parts["alpha"][0]) if "alpha" in parts else None
        plain = {_PLAIN[s]: v for s, (_, v) in parts.items() if s in _PLAIN}
        lyco = {s: v for s, (_, v) in parts.items() if s not in _PLAIN and s != "alpha"}
        if plain and lyco:
            raise FormatError(f"module {prefix}: both LoRA and LyCORIS tensors", path)
        if name in ad.modules:
            raise FormatError(f"module {prefix}: two names map to the same module {name}", path)
        if plain:
            mod = make_module(name, plain.get("down"), plain.get("up"), path, prefix, alpha)
            types["LoRA"] = types.get("LoRA", 0) + 1
        else:
            mod = _module(name, prefix, lyco, alpha, path)
            types[mod.lycoris_type] = types.get(mod.lycoris_type, 0) + 1  # type: ignore[attr-defined]
        ad.modules[name] = mod
    ad.unparsed_keys = sorted(unparsed)
    form = max(forms, key=forms.__getitem__) if forms else "kohya"
    ad.dialect_variant = f"lycoris-{form} ({', '.join(f'{k} {v}' for k, v in sorted(types.items()))})"
    return ad


def _write(adapter: Adapter, dtype, metadata):
    raise UsageError("lora-merge writes LoRA dialects only (kohya, diffusers, peft, comfyui); convert a LyCORIS "
                     "file with --to <dialect> --rank K")


class _LycorisDialect(FileDialect):
    #: read only: ``save``/``convert --to lycoris`` are refused (write a LoRA dialect with a rank instead)
    writable = False

    def locate(self, path: Path) -> Located | None:
        """A ``.safetensors`` file with any LoHa/LoKr/diff key is LyCORIS, whatever its other keys say."""
        if path.is_dir() or path.suffix.lower() != ".safetensors":
            return None
        try:
            keys = read_header(path).tensors
        except FormatError:
            return None  # the normal read reports it
        return Located(path) if any(is_lycoris_key(k) for k in keys) else None


#: LyCORIS LoHa / LoKr / full-diff files (read only; written as LoRA after re-factoring).
DIALECT = _LycorisDialect(name="lycoris", label="LyCORIS", precedence=0, claimer=claims, reader=read,
                          writer=_write)


# ---------------------------------------------------------------- LyCORIS → LoRA
def has_lycoris(adapter: Adapter) -> bool:
    return any(isinstance(m, LycorisModule) for m in adapter)


def needs_rank(adapter: Adapter, what: str) -> UsageError:
    kinds = sorted({m.lycoris_type for m in adapter if isinstance(m, LycorisModule)})  # type: ignore[attr-defined]
    return UsageError(f"{adapter.display_name}: holds {'/'.join(kinds)} modules, whose ΔW is not a low-rank B·A; "
                      f"give --rank K to {what} (the relative ΔW error it costs is reported; --max-error E "
                      "refuses more)")


def to_lora_for_output(adapter: Adapter, rank: int | None, max_error: float | None = None
                       ) -> tuple[Adapter, dict | None]:
    """What ``convert`` writes: the adapter itself without ``rank`` (refused when it holds LyCORIS modules),
    else :func:`to_lora`."""
    if rank is None:
        if has_lycoris(adapter):
            raise needs_rank(adapter, "write it as a LoRA")
        if max_error is not None:
            raise UsageError("--max-error needs --rank")
        return adapter, None
    return to_lora(adapter, rank, max_error=max_error)


def describe_cost(report: dict) -> str:
    """One line: how many modules were re-factored and the relative ΔW error."""
    worst = f", {report['rel_error_max']:.3g} at worst ({report['worst_module']})" if report["worst_module"] else ""
    return (f"re-factored {report['modules_refactored']} modules to rank {report['rank']}: relative ΔW error "
            f"‖ΔW−BA‖/‖ΔW‖ {report['rel_error_overall']:.3g} over all modules{worst}")


def to_lora(adapter: Adapter, rank: int, *, max_error: float | None = None,
            dtype: torch.dtype | None = None) -> tuple[Adapter, dict]:
    """Every LoHa/LoKr/diff module re-factored to a rank-``rank`` LoRA (truncated SVD of its exact ΔW, the
    best rank-K approximation); plain LoRA modules above ``rank`` too.  Returns the adapter and a report:
    the relative Frobenius error ``‖ΔW − B A‖ / ‖ΔW‖`` over all modules and per module.  ``max_error``
    refuses (:class:`UsageError`, naming the worst module) when the overall error is above it."""
    if rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    out = Adapter(metadata=dict(adapter.metadata), dialect=None if adapter.dialect == "lycoris" else adapter.dialect,
                  source=adapter.source, config=adapter.config, extra_tensors=dict(adapter.extra_tensors))
    per: dict[str, float] = {}
    num = den = 0.0
    for m in adapter:
        if not isinstance(m, LycorisModule) and m.rank <= rank:
            out.modules[m.name] = m
            continue
        if m.rank < min(m.out_features, m.in_features):  # from the factors (LoRA, structured LoHa/LoKr)
            b, a = m.factors(torch.float32)
            sv = linalg.singular_values(b * m.scale, a).double()
            k = min(rank, sv.numel())
            up, down = linalg.refactor(b * m.scale, a, k)
            n2, err2 = float((sv**2).sum()), float((sv[k:] ** 2).sum())
        else:  # identity-factorized: a truncated SVD of the dense ΔW (the best rank-K approximation)
            up, down, err, norm = linalg.refactor_dense_error(m.delta(torch.float32), rank)
            err2, n2 = (err * norm) ** 2, norm**2
        per[m.name] = (err2 / n2) ** 0.5 if n2 > 0 else 0.0
        num, den = num + err2, den + n2
        st = dtype or (m.parts[next(iter(m.parts))].dtype if isinstance(m, LycorisModule) else m.dtype)
        out.modules[m.name] = LoraModule.from_factors(m.name, up, down, m.weight_shape, st)
        out.modules[m.name].bias = m.bias
    overall = (num / den) ** 0.5 if den > 0 else 0.0
    worst = max(per, key=per.__getitem__) if per else None
    report = {"rank": rank, "rel_error_overall": overall, "rel_error_max": per[worst] if worst else 0.0,
              "worst_module": worst, "modules_refactored": len(per), "per_module": per}
    if max_error is not None and overall > max_error:
        raise UsageError(f"{adapter.display_name}: re-factoring to rank {rank} costs a relative ΔW error of {overall:.4g} over all "
                         f"modules (worst {per[worst]:.4g} at {worst}), above --max-error {max_error:g}; "
                         "raise --rank")
    return out, report
