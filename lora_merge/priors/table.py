"""Layer priors as data: which UNet blocks carry content and which carry style (DuoLoRA, docs/algorithms.md §6).

A :class:`LayerPriors` is an ordered list of rules ``{pattern, role, score}``; the first rule whose pattern
matches a module name decides its role (``content``, ``style`` or ``neutral``), and modules no rule
matches get ``default`` (``neutral``).  Patterns are ``fnmatch`` globs on the canonical module path; a
pattern also matches everything below it (``unet.up_blocks.0`` matches
``unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q``) and the leading ``unet.`` is optional.
``score`` (default 1) multiplies the prior's weight in the objective for the layers the rule matches
(measured priors can use it to say how sure they are).

Built-in tables (``lora-merge priors ARCH``):

* ``sdxl``, ``sd1`` (``sd2``): by the paper's rule, grouped by resolution (:func:`lora_merge.arch.block_resolutions`):
  a block is *content* when its latent resolution is at most a quarter of the native latent size
  (SDXL 1024 px → latent 128: ``down_blocks.2``, ``mid_block``, ``up_blocks.0`` at 32) and *style*
  otherwise (SDXL ``down_blocks.1``, ``up_blocks.1`` at 64; the attention-free 128 blocks too).  SD 1.x
  (latent 64): content = ``down_blocks.2``/``.3``, ``mid_block``, ``up_blocks.0``/``.1`` (16 and 8), style =
  ``down_blocks.0``/``.1``, ``up_blocks.2``/``.3`` (64 and 32).  Text encoders are neutral.
* ``b-lora``: B-LoRA's finding on SDXL: ``up_blocks.0.attentions.0`` content, ``up_blocks.0.attentions.1``
  style, everything else neutral.

The tables come from the families (:mod:`lora_merge.families`): each UNet family with block resolutions
has the resolution rule under its name (what ``--priors auto`` picks, its ``auto_priors``), and a family's
``priors`` names its published tables (SDXL's ``b-lora``, FLUX.1's ``flux-splitflux``).  Add a table with
:func:`register_priors` (the bundled toy world registers its own, the paper's rule on its block resolutions
via :func:`priors_for_arch`, from its plug-in, see :mod:`lora_merge.plugins`).  File format (JSON, or YAML
by extension)::

    {"format": "lora-merge.priors/1", "arch": "sdxl", "source": "measured by ...", "default": "neutral",
     "rules": [{"pattern": "unet.up_blocks.0.attentions.0", "role": "content", "score": 0.8}, ...]}
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from .. import families, plugins
from ..arch import block_resolutions, native_latent
from ..errors import FormatError, UsageError
from ..files import atomic_write_text, refuse_existing

ROLES = ("content", "style", "neutral")
PRIORS_FORMAT = "lora-merge.priors/1"


@dataclass(frozen=True)
class PriorRule:
    pattern: str
    role: str
    score: float = 1.0
    resolution: int | None = None  # informational (tables built from resolutions)

    def matches(self, module: str) -> bool:
        names = [module]
        if module.startswith("unet."):
            names.append(module[len("unet."):])
        pats = [self.pattern]
        if self.pattern.startswith("unet."):
            pats.append(self.pattern[len("unet."):])
        return any(fnmatchcase(n, p) or fnmatchcase(n, p + ".*") for n in names for p in pats)


@dataclass
class LayerPriors:
    rules: list[PriorRule] = field(default_factory=list)
    arch: str | None = None
    source: str = ""
    default: str = "neutral"
    name: str = ""

    def rule_for(self, module: str) -> PriorRule | None:
        cache = self.__dict__.setdefault("_cache", {})
        if module not in cache:
            cache[module] = next((r for r in self.rules if r.matches(module)), None)
        return cache[module]

    def role_of(self, module: str) -> str:
        r = self.rule_for(module)
        return r.role if r is not None else self.default

    def score_of(self, module: str) -> float:
        r = self.rule_for(module)
        return r.score if r is not None else 1.0

    def to_dict(self) -> dict:
        rules = []
        for r in self.rules:
            d = {"pattern": r.pattern, "role": r.role, "score": r.score}
            if r.resolution is not None:
                d["resolution"] = r.resolution
            rules.append(d)
        return {"format": PRIORS_FORMAT, "arch": self.arch, "source": self.source, "default": self.default,
                "rules": rules}  # fmt: skip

    def to_file(
        self,
        path: str | os.PathLike,
        force: bool = False,
        extra: dict | None = None,
        inputs: tuple[str | os.PathLike, ...] = (),
    ) -> Path:
        """Write JSON (or YAML for ``.yaml``/``.yml``) atomically; refuses an existing file without
        ``force`` and any of ``inputs`` always.  ``extra`` adds top-level sections that readers ignore
        (a measurement's details)."""
        path = Path(path)
        refuse_existing(path, force, inputs)
        data = {**self.to_dict(), **(extra or {})}
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=2) + "\n"
        return atomic_write_text(path, text)

    @classmethod
    def from_dict(cls, data: dict, where: str | os.PathLike | None = None) -> LayerPriors:
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
            raise FormatError("a priors file needs a 'rules' list", where)
        fmt = data.get("format", PRIORS_FORMAT)
        if fmt != PRIORS_FORMAT:
            raise FormatError(f"unknown priors format {fmt!r} (expected {PRIORS_FORMAT!r})", where)
        default = data.get("default", "neutral")
        if default not in ROLES:
            raise FormatError(f"default role {default!r} is not one of {', '.join(ROLES)}", where)
        rules = []
        for i, r in enumerate(data["rules"]):
            if not isinstance(r, dict) or not isinstance(r.get("pattern"), str) or r.get("role") not in ROLES:
                raise FormatError(f"rule {i} needs a string 'pattern' and a 'role' in {', '.join(ROLES)}", where)
            try:
                score = float(r.get("score", 1.0))
            except (TypeError, ValueError):
                raise FormatError(f"rule {i}: score {r.get('score')!r} is not a number", where) from None
            if score < 0:
                raise FormatError(f"rule {i}: score must be ≥ 0", where)
            res = r.get("resolution")
            rules.append(PriorRule(r["pattern"], r["role"], score, int(res) if res is not None else None))
        return cls(rules, data.get("arch"), str(data.get("source", "")), default,
                   name=os.fspath(where) if where else "")  # fmt: skip

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> LayerPriors:
        path = Path(path)
        if not path.is_file():
            raise UsageError("priors file not found", path)
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - json and yaml parse errors
            raise FormatError(f"cannot parse priors file ({exc.__class__.__name__}: {exc})", path) from None
        return cls.from_dict(data, path)


def priors_from_resolutions(arch: str, resolutions: dict[str, int], native: int, source: str = "") -> LayerPriors:
    """The paper's rule on a block→resolution map: content when ``res ≤ native/4``, else style."""
    rules = []
    for block, res in sorted(resolutions.items(), key=lambda kv: (kv[1], kv[0])):
        role = "content" if res * 4 <= native else "style"
        rules.append(PriorRule(f"unet.{block}", role, 1.0, res))
    src = source or f"resolution rule: content if latent ≤ {native // 4} (native {native}), else style"
    return LayerPriors(rules, arch, src, "neutral", name=arch)


def b_lora() -> LayerPriors:
    """B-LoRA's SDXL table (the SDXL family names it ``b-lora``)."""
    return LayerPriors(
        [PriorRule("unet.up_blocks.0.attentions.0", "content", 1.0, 32),
         PriorRule("unet.up_blocks.0.attentions.1", "style", 1.0, 32)],
        "sdxl", "B-LoRA (Frenkel et al., arXiv 2403.14572): up_blocks.0.attentions.0 content, .1 style",
        "neutral", name="b-lora",
    )  # fmt: skip


def priors_for_arch(arch: str) -> LayerPriors:
    """The paper's resolution rule on ``arch``'s blocks (:func:`lora_merge.arch.block_resolutions`)."""
    res, native = block_resolutions(arch), native_latent(arch)
    if res is None or native is None:
        raise UsageError(f"no block resolutions for architecture {arch!r}")
    return priors_from_resolutions(arch, res, native)


_b_lora = b_lora

#: tables registered with :func:`register_priors` (plug-ins, user code); they win over the families' own
_BUILTIN: dict[str, Callable[[], LayerPriors]] = {}


def register_priors(name: str, factory: Callable[[], LayerPriors]) -> None:
    """Add a named table, usable as ``--priors NAME`` and ``lora-merge priors NAME``; ``factory()`` builds
    it on each use."""
    _BUILTIN[name] = factory


def _family_tables() -> dict[str, Callable[[], LayerPriors]]:
    """The tables the families hold: the resolution rule of each family with block resolutions (under its
    name), then each family's published tables (resolved from their ``"module:attr"`` strings)."""
    out: dict[str, Callable[[], LayerPriors]] = {}
    for fam in families.all_families():
        if fam.block_resolutions is not None and fam.native_latent is not None:
            out[fam.name] = lambda name=fam.name: priors_for_arch(name)
    for fam in families.all_families():
        for table, ref in fam.priors.items():
            out.setdefault(table, lambda ref=ref: families.resolve(ref)())
    return out


def _lookup(spec: str) -> Callable[[], LayerPriors] | None:
    return _BUILTIN.get(spec) or _family_tables().get(spec)


def builtin_priors() -> list[str]:
    """The names of the built-in and registered tables (plug-ins loaded)."""
    plugins.load_all()
    return sorted(set(_family_tables()) | set(_BUILTIN))


def load_priors(spec: str, arch: str | None = None) -> LayerPriors:
    """``sdxl`` | ``sd1`` | ``sd2`` | ``b-lora`` | ``flux-splitflux`` | a registered name | ``auto`` (the
    family's ``auto_priors``, from ``arch``) | a file path."""
    if spec == "auto":
        if arch is None:
            raise UsageError("cannot pick layer priors: the architecture is unknown (pass --arch or --priors)")
        fam = families.get(arch)
        spec = fam.auto_priors if fam is not None and fam.auto_priors else arch
    factory = _lookup(spec)
    if factory is None and plugins.load_for("priors", spec):
        factory = _lookup(spec)
    if factory is not None:
        return factory()
    if os.path.sep in spec or spec.endswith((".json", ".yaml", ".yml")) or Path(spec).exists():
        return LayerPriors.from_file(spec)
    raise UsageError(f"no layer priors for {spec!r}; built-in: {', '.join(builtin_priors())}, or a priors file")
