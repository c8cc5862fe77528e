"""Architecture facts: which model a LoRA targets, and each UNet block's name and latent resolution.

The facts are data in :mod:`lora_merge.families` (one :class:`~lora_merge.families.ModelFamily` per
family, registered in one place and imported on first use); this module asks them.  Resolutions are
latent sizes at the architecture's native image size (SDXL 1024 px → 128, SD 1.x 512 px → 64), see
docs/algorithms.md §7.  :data:`ARCH_NAMES`, :data:`BLOCK_RESOLUTIONS` and :data:`NATIVE_LATENT` are
read-only views of the registry.

Other architectures are added with :func:`register_arch` (a thin wrapper of
:func:`lora_merge.families.register_family`; the bundled toy world registers its own from its plug-in,
see :mod:`lora_merge.plugins`); a name no built-in family has is looked up in the plug-ins that declare it.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from . import families
from .families import ModelFamily

if TYPE_CHECKING:
    from .adapter import Adapter

#: the attention projections a diffusers UNet's LoRAs usually target (PEFT ``target_modules`` suffixes)
ATTENTION_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class _FamilyFacts(Mapping[str, Any]):
    """family name → one of its facts (``display``, ``block_resolutions``, ``native_latent``), read-only;
    families without the fact are absent.  A name no family has is looked up in the plug-ins."""

    def __init__(self, fact: str):
        self._fact = fact

    def __getitem__(self, name: str) -> Any:
        fam = families.get(name) if isinstance(name, str) else None
        value = None if fam is None else getattr(fam, self._fact)
        if value is None:
            raise KeyError(name)
        return dict(value) if isinstance(value, Mapping) else value

    def __iter__(self) -> Iterator[str]:
        return iter([f.name for f in families.all_families() if getattr(f, self._fact) is not None])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fact!r}: {dict(self.items())!r})"


#: family → block prefix (without the "unet." component) → latent resolution (UNet families)
BLOCK_RESOLUTIONS: Mapping[str, dict[str, int]] = _FamilyFacts("block_resolutions")
#: family → native latent side length (the resolution rule's reference: content at most a quarter of it)
NATIVE_LATENT: Mapping[str, int] = _FamilyFacts("native_latent")
#: family → display name
ARCH_NAMES: Mapping[str, str] = _FamilyFacts("display")


def register_arch(
    name: str,
    display_name: str,
    *,
    block_resolutions: dict[str, int] | None = None,
    native_latent: int | None = None,
    detect: Callable[[Adapter], bool] | None = None,
) -> ModelFamily:
    """Add an architecture (or change a known one): its display name, its UNet blocks' latent resolutions
    at the native size, the native latent size and ``detect(adapter) -> bool`` for :func:`guess_arch`
    (asked before the built-in families' rules, in registration order).  The family registered is
    returned; a plug-in may instead build a :class:`~lora_merge.families.ModelFamily` itself and call
    :func:`lora_merge.families.register_family`."""
    base = families.get(name, load_plugins=False)
    if base is None:
        base = ModelFamily(name=name, display=display_name)
    own_rules = base.detect if families.is_registered(name) else ()
    changes: dict[str, Any] = {"display": display_name,
                               "short": display_name if base.short == base.display else base.short,
                               "detect": ((0, detect),) if detect is not None else own_rules}
    if block_resolutions is not None:
        changes["block_resolutions"] = dict(block_resolutions)
    if native_latent is not None:
        changes["native_latent"] = int(native_latent)
    return families.register_family(dataclasses.replace(base, **changes))


def arch_name(arch: str) -> str:
    """Display name of ``arch`` (the name itself when unknown)."""
    fam = families.get(arch)
    return fam.display if fam is not None else arch


def block_resolutions(arch: str | None) -> dict[str, int] | None:
    """Block → latent resolution of ``arch`` at its native size, or None when unknown."""
    fam = families.get(arch)
    return None if fam is None or fam.block_resolutions is None else dict(fam.block_resolutions)


def native_latent(arch: str | None) -> int | None:
    fam = families.get(arch)
    return None if fam is None else fam.native_latent


def unet_block_resolutions(unet: Any, latent_size: int | None = None) -> dict[str, int]:
    """Latent side length each block of a diffusers ``UNet2DConditionModel`` runs at, for input latents of
    side ``latent_size`` (default: the UNet's ``config.sample_size``, its native size).

    Read from the block structure (a block with a downsampler halves the size for the next one, an
    upsampler doubles it), so it holds for any UNet layout; gives SDXL's and SD 1.x's tables above."""
    if latent_size is None:
        cfg = getattr(unet, "config", None)
        sample = getattr(cfg, "sample_size", None)
        if sample is None:
            raise ValueError("pass latent_size: the model has no config.sample_size")
        latent_size = sample if isinstance(sample, int) else sample[0]
    res: dict[str, int] = {}
    size = int(latent_size)
    for i, blk in enumerate(getattr(unet, "down_blocks", [])):
        res[f"down_blocks.{i}"] = size
        if getattr(blk, "downsamplers", None) is not None:
            size = max(1, (size + 1) // 2)
    if getattr(unet, "mid_block", None) is not None:
        res["mid_block"] = size
    for i, blk in enumerate(getattr(unet, "up_blocks", [])):
        res[f"up_blocks.{i}"] = size
        if getattr(blk, "upsamplers", None) is not None:
            size *= 2
    if not res:
        raise ValueError("the model is not a UNet with down/mid/up blocks")
    return res


def dit_block_lists() -> tuple[str, ...]:
    """The numbered block lists of DiT transformers, in native and diffusers names (FLUX double/single,
    SD3's joint blocks, Wan's blocks, Z-Image's layers and refiners …): every family's ``block_lists``."""
    return _patterns()[0]


_PATTERNS: tuple[int, tuple[str, ...], re.Pattern, re.Pattern] | None = None


def _patterns() -> tuple[tuple[str, ...], re.Pattern, re.Pattern]:
    """``(DIT_BLOCK_LISTS, DIT_BLOCK_RE, the layer pattern of block_of)``, rebuilt when a family is registered."""
    global _PATTERNS
    gen = families.generation()
    if _PATTERNS is None or _PATTERNS[0] != gen:
        lists = tuple(dict.fromkeys(lst for fam in families.all_families() for lst in fam.block_lists))
        block = re.compile(rf"^transformer\.(({'|'.join(lists)})\.(\d+))\.")
        # a numbered layer or block as whole path components (``double_blocks.3`` is not ``blocks.3``)
        layer = re.compile(rf"(?:^|\.)((?:{'|'.join(('layer', 'h') + lists)})\.\d+)(?:\.|$)")
        _PATTERNS = (gen, lists, block, layer)
    return _PATTERNS[1], _PATTERNS[2], _PATTERNS[3]


def __getattr__(name: str) -> Any:
    # DIT_BLOCK_LISTS (the block lists above) and DIT_BLOCK_RE (a DiT block path: group 1
    # ``transformer_blocks.3``, group 2 the list, group 3 the index), built from the registry on first use
    if name == "DIT_BLOCK_LISTS":
        return _patterns()[0]
    if name == "DIT_BLOCK_RE":
        return _patterns()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_BLOCK_RE = re.compile(r"(?:^|\.)((?:down_blocks|up_blocks)\.\d+|mid_block)(?:\.(attentions|resnets|downsamplers|upsamplers)\.(\d+))?")


def component_of(name: str) -> str:
    """``unet``, ``text_encoder``, ``text_encoder_2``, ``transformer`` or ``model`` (anything else)."""
    head = name.split(".", 1)[0]
    return head if head in ("unet", "text_encoder", "text_encoder_2", "transformer") else "model"


def unet_block_of(name: str) -> str | None:
    """``down_blocks.1``/``mid_block``/``up_blocks.0`` for UNet module paths, else None."""
    if component_of(name) not in ("unet",) and not name.startswith(("down_blocks", "up_blocks", "mid_block")):
        return None
    m = _BLOCK_RE.search(name)
    return m.group(1) if m else None


def sub_block_of(name: str) -> str | None:
    """The finer block, e.g. ``up_blocks.0.attentions.1`` (B-LoRA's unit), or the block itself."""
    m = _BLOCK_RE.search(name)
    if not m or unet_block_of(name) is None:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m.group(2) else m.group(1)


def block_sort_key(block: str) -> tuple[int, int, str]:
    """UNet order of block names: ``down_blocks.*`` by index, ``mid_block``, then ``up_blocks.*``."""
    head, _, rest = block.partition(".")
    index = rest.split(".", 1)[0]
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(head, 3)
    return (order, int(index) if index.isdigit() else 0, block)


def block_of(name: str) -> str:
    """A grouping key for per-block tables: UNet sub-block, text-encoder layer, or the component."""
    sub = sub_block_of(name)
    if sub is not None:
        return f"unet.{sub}"
    m = _patterns()[2].search(name)
    comp = component_of(name)
    if m:
        return f"{comp}.{m.group(1)}" if comp != "model" else m.group(1)
    return comp


def resolution_of(name: str, arch: str | None) -> int | None:
    block = unet_block_of(name)
    table = block_resolutions(arch) if block is not None else None
    return None if table is None else table.get(block)


def guess_arch(adapter: Adapter) -> str | None:
    """Best guess of the base model from the families' detection rules (plug-in families first, then the
    built-in ones in rank order, :func:`lora_merge.families.detect`); None when nothing fits.

    PEFT adapters for non-diffusion models return their ``base_model_name_or_path``.
    """
    names = list(adapter.modules)
    if adapter.config and adapter.config.get("base_model_name_or_path") and not any(
        n.startswith(("unet.", "text_encoder")) for n in names
    ):
        return str(adapter.config["base_model_name_or_path"])
    return families.detect(adapter)


def is_diffusion_adapter(adapter: Adapter) -> bool:
    """Whether the adapter's modules belong to a diffusion pipeline (UNet, text encoders, transformer)."""
    dits = [f for f in families.all_families() if f.block_pattern is not None]

    def diffusion(n: str) -> bool:
        comp = component_of(n)
        if comp == "transformer":  # a DiT family's blocks (FLUX.1, SD3, Wan …), not GPT-2's transformer.h.N
            return any(f.has_block_module(n) for f in dits)
        return comp != "model" or unet_block_of(n) is not None

    return any(diffusion(n) for n in adapter.modules)


def arch_family(adapter: Adapter) -> tuple[str, frozenset[str] | None, str]:
    """What :func:`check_same_arch` compares: ``(kind, possible archs, label)``.

    ``kind`` is ``"diffusion"`` or ``"model"`` (any other model, e.g. a PEFT adapter of GPT-2);
    ``possible archs`` is None when the modules do not tell (a small partial LoRA), else the set of
    architectures the adapter can belong to (``{"sd1", "sd2"}`` when only SDXL is ruled out); the label
    names it in a message."""
    if not is_diffusion_adapter(adapter):
        base = (adapter.config or {}).get("base_model_name_or_path")
        return "model", None, str(base) if base else "a non-diffusion model"
    guess = guess_arch(adapter)
    if families.get(guess) is None:  # None, or a PEFT config's base_model_name_or_path
        return "diffusion", None, "an unknown diffusion model"
    strong = guess
    if guess == "sd1" and not any(n.endswith(("attn2.to_k", "attn2.to_v")) for n in adapter.modules):
        # guessed from the block layout only: SD 2.x has the same blocks (SDXL has no down_blocks.0 attentions)
        return "diffusion", frozenset({"sd1", "sd2"}), "Stable Diffusion 1.x/2.x"
    return "diffusion", frozenset({strong}), arch_name(strong)


def mixed_arch_problem(adapters: list[Adapter], names: list[str]) -> str | None:
    """A one-line description of the first pair of inputs whose architectures differ, or None.

    Two diffusion LoRAs are compatible when their possible architectures overlap (an unknown one is
    compatible with every one); two adapters of non-diffusion models are compared by their module names
    and shapes only; a diffusion LoRA and an adapter of another model never are."""
    fams = [arch_family(ad) for ad in adapters]
    for i in range(len(fams)):
        for j in range(i + 1, len(fams)):
            (ki, ai, li), (kj, aj, lj) = fams[i], fams[j]
            if ki != kj or (ai is not None and aj is not None and not ai & aj):
                return (f"input {i + 1} ({names[i]}) is a LoRA for {li} but input {j + 1} ({names[j]}) is for "
                        f"{lj}; LoRAs of different base models cannot be merged")
    return None
