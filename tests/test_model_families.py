"""Model families as data (lora_merge.families): one ModelFamily per family, registered in one place and
imported on first use; the rest of the package (arch, formats.dit_arch, formats.layout, priors, dit_base,
help texts) reads the family instead of keeping its own table."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from lora_merge import Adapter, LoraModule, arch, families
from lora_merge.families import BUILTIN, ModelFamily


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def _ad(shapes: dict[str, tuple[int, int]], metadata: dict | None = None) -> Adapter:
    ad = Adapter(metadata=dict(metadata or {}))
    for n, (o, i) in shapes.items():
        ad.modules[n] = LoraModule.from_tensors(n, torch.zeros(1, i), torch.zeros(o, 1))
    return ad


def test_every_builtin_module_defines_its_family():
    for name, module in BUILTIN.items():
        fam = families.get(name)
        assert isinstance(fam, ModelFamily) and fam.name == name, module
        assert fam.kind in ("unet", "dit") and fam.display and fam.short and fam.help and fam.detect
        assert (fam.block_resolutions is not None) == (fam.kind == "unet"), name
        if fam.kind == "dit":
            assert fam.diffusers_class and fam.blocks and fam.hidden and set(fam.blocks) <= set(fam.block_lists)
    assert [f.name for f in families.builtin_families()] == list(BUILTIN)
    assert families.names()[:len(BUILTIN)] == list(BUILTIN)  # then the plug-ins' (the toy world, once loaded)


def test_a_lookup_imports_only_that_familys_module():
    res = _run(
        """
        import sys
        from lora_merge import arch, families
        def fams():
            return sorted(m for m in sys.modules if m.startswith("lora_merge.families."))
        assert fams() == [], fams()
        assert arch.arch_name("z-image") == "Z-Image"
        assert fams() == ["lora_merge.families.zimage"], fams()
        assert arch.block_resolutions("sd2")["down_blocks.3"] == 8  # sd2 reuses sd1's table
        assert fams() == ["lora_merge.families.sd1", "lora_merge.families.sd2", "lora_merge.families.zimage"], fams()
        assert not any(m.startswith("lora_merge.formats") for m in sys.modules)  # data only: nothing above
        """
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_arch_tables_are_views_of_the_families():
    assert dict(arch.ARCH_NAMES) == {f.name: f.display for f in families.all_families()}
    assert arch.BLOCK_RESOLUTIONS["sdxl"] == dict(families.get("sdxl").block_resolutions)
    assert set(arch.BLOCK_RESOLUTIONS) >= {"sd1", "sd2", "sdxl"} and "flux" not in arch.BLOCK_RESOLUTIONS
    assert arch.NATIVE_LATENT["sd1"] == 64 and arch.native_latent("sdxl") == 128
    assert arch.ARCH_NAMES.get("no-such-arch", "x") == "x" and "no-such-arch" not in arch.ARCH_NAMES
    # the DiT block lists: every family's, in registry order
    assert arch.DIT_BLOCK_LISTS == ("transformer_blocks", "single_transformer_blocks", "double_blocks",
                                    "single_blocks", "joint_blocks", "blocks", "layers", "noise_refiner",
                                    "context_refiner")
    assert arch.DIT_BLOCK_RE.match("transformer.noise_refiner.1.attention.to_q").group(1) == "noise_refiner.1"
    from lora_merge.formats import dit_arch

    assert list(dit_arch.FAMILIES) == ["flux", "flux2", "sd3", "wan", "z-image", "qwen-image"]
    assert dit_arch.FAMILIES["sd3"].display == "Stable Diffusion 3 / 3.5" and "sdxl" not in dit_arch.FAMILIES
    assert set(dit_arch.FUSED_LAYOUTS) == {"flux", "flux2", "sd3", "z-image"}
    assert dit_arch.FUSED_LAYOUTS["z-image"].family == "z-image"


SD_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.mark.parametrize("shapes,metadata,want", [
    ({SD_K: (320, 768)}, None, "sd1"),
    ({SD_K: (320, 1024)}, None, "sd2"),
    ({SD_K: (320, 2048)}, None, "sdxl"),
    ({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (8, 8)}, None, "sdxl"),
    ({"unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8)},
     {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"unet.up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_q": (8, 8)}, None, "sdxl"),
    ({"unet.down_blocks.0.attentions.0.proj_in": (8, 8)}, None, "sd1"),
    ({"transformer.single_transformer_blocks.0.attn.to_q": (8, 8)}, None, "flux"),
    ({"transformer.double_blocks.0.img_attn.qkv": (9216, 3072)}, None, "flux"),
    ({"transformer.double_blocks.0.img_attn.qkv": (18432, 6144)}, None, "flux2"),
    ({"transformer.transformer_blocks.0.attn.to_q": (3072, 3072)}, None, "flux"),
    ({"transformer.transformer_blocks.0.attn.to_q": (1536, 1536)}, None, None),
    ({"transformer.transformer_blocks.0.attn.add_k_proj": (1536, 1536)}, None, "sd3"),
    ({"transformer.joint_blocks.0.x_block.attn.qkv": (4608, 1536)}, None, "sd3"),
    ({"transformer.transformer_blocks.30.attn.to_q": (3072, 3072)}, None, "qwen-image"),
    ({"transformer.blocks.0.self_attn.q": (8, 8)}, None, "wan"),
    ({"transformer.layers.0.attention.qkv": (9, 3)}, None, "z-image"),
    ({"transformer.h.0.attn.c_attn": (9, 3)}, None, None),
])
def test_detection_asks_the_families_in_rank_order(shapes, metadata, want):
    assert arch.guess_arch(_ad(shapes, metadata)) == want


def test_the_families_name_their_layouts_priors_and_pipeline_loaders():
    from lora_merge.formats.layout import layouts

    lays = {lay.family: lay for lay in layouts()}
    with_layout = [f for f in families.all_families() if f.layout]
    assert list(lays) == [f.name for f in with_layout] == ["flux", "flux2", "sd3", "wan", "z-image"]
    for fam in with_layout:
        lay = families.resolve(fam.layout)
        assert lays[fam.name] is lay and lay.family == fam.name
        assert dict(lay.describe) == dict(fam.layout_notes) and set(fam.layout_notes) == {"native", "diffusers", "mixed"}
        assert dict(lay.dialect_layout or {}) == dict(fam.dialect_layout)
        if fam.fused_layout:
            assert families.resolve(fam.fused_layout).family == fam.name
    for fam in families.all_families():
        for table, ref in fam.priors.items():
            assert families.resolve(ref)().name == table
        if fam.pipeline_loader:
            assert callable(families.resolve(fam.pipeline_loader)) and fam.pipelines


def test_priors_tables_come_from_the_families():
    from lora_merge.priors import builtin_priors, load_priors

    assert {"sd1", "sd2", "sdxl", "b-lora", "flux-splitflux"} <= set(builtin_priors())
    assert load_priors("auto", "sdxl").name == "sdxl"
    assert load_priors("b-lora").arch == "sdxl" and load_priors("flux-splitflux").arch == "flux"
    assert families.get("sdxl").auto_priors == "sdxl" and families.get("flux").auto_priors is None


def test_flow_pipelines_come_from_the_families():
    from lora_merge.model_mode import base_model, dit_base

    assert dit_base.FLOW_PIPELINES == {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3",
                                       "ZImagePipeline": "z-image"}
    assert set(dit_base.FLOW_PARTS) == set(dit_base.FLOW_PIPELINES.values())
    for cls in dit_base.FLOW_PIPELINES:
        assert base_model._PIPELINE_LOADERS[cls] is dit_base.load_flow_pipeline
        assert families.by_pipeline(cls).diffusers_class


def test_help_texts_list_the_families():
    assert families.help_list(lambda f: bool(f.pipelines)) == "SD 1.x, SDXL, FLUX.1, SD3/3.5, Z-Image"
    assert families.help_list(key="name", last=" or ").endswith("z-image or qwen-image")
    from lora_merge.cli.inspect_cmd import inspect_cmd

    arch_help = next(p.help for p in inspect_cmd.params if p.name == "arch_name")
    assert all(name in arch_help for name in BUILTIN)


def test_a_registered_family_is_asked_first_and_shows_everywhere():
    """Adding a family is data: one ModelFamily (here registered, as a plug-in would) makes detection,
    display names, block lists, DiT facts and inspect's summary know it."""
    res = _run(
        """
        import re, torch
        from lora_merge import Adapter, LoraModule, arch, families
        from lora_merge.families import ModelFamily
        from lora_merge.formats import dit_arch

        def is_demo(ad):
            return any(re.match(r"transformer\\.demo_blocks\\.\\d+\\.", n) for n in ad.modules)

        families.register_family(ModelFamily(
            name="demo-dit", display="Demo DiT", kind="dit", help="a test family", detect=((0, is_demo),),
            diffusers_class="DemoTransformer", blocks={"demo_blocks": 4}, hidden=8, block_lists=("demo_blocks",)))
        ad = Adapter()
        for n in ("transformer.demo_blocks.0.attn.to_q", "transformer.demo_blocks.2.attn.to_q"):
            ad.modules[n] = LoraModule.from_tensors(n, torch.zeros(1, 8), torch.zeros(8, 1))
        assert arch.guess_arch(ad) == "demo-dit"
        assert arch.is_diffusion_adapter(ad) and arch.arch_name("demo-dit") == "Demo DiT"
        assert "demo_blocks" in arch.DIT_BLOCK_LISTS and arch.block_of("transformer.demo_blocks.2.attn.to_q") == \\
            "transformer.demo_blocks.2"
        assert dit_arch.family_summary(ad) == {"family": "demo-dit", "family_name": "Demo DiT",
                                               "blocks": {"demo_blocks": 2}, "blocks_in_model": {"demo_blocks": 4}}
        assert arch.arch_family(ad)[1] == frozenset({"demo-dit"})
        """
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_register_arch_is_a_thin_wrapper_of_register_family():
    res = _run(
        """
        from lora_merge import Adapter, arch, families
        fam = arch.register_arch("demo-unet", "A demo UNet", block_resolutions={"down_blocks.0": 8, "mid_block": 2},
                                 native_latent=8, detect=lambda ad: (ad.metadata or {}).get("arch") == "demo")
        assert families.get("demo-unet") is fam and fam.auto_priors == "demo-unet"
        assert arch.guess_arch(Adapter(metadata={"arch": "demo"})) == "demo-unet"
        assert arch.resolution_of("unet.mid_block.attentions.0.to_q", "demo-unet") == 2
        from lora_merge.priors import load_priors
        assert load_priors("auto", "demo-unet").role_of("unet.mid_block.attentions.0.to_q") == "content"
        # renaming a built-in keeps its facts and its own detection
        arch.register_arch("sdxl", "SDXL (renamed)")
        assert arch.arch_name("sdxl") == "SDXL (renamed)" and arch.native_latent("sdxl") == 128
        assert arch.guess_arch(Adapter(metadata={"ss_base_model_version": "sdxl_v1"})) == "sdxl"
        """
    )
    assert res.returncode == 0, res.stdout + res.stderr
