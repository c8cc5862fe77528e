"""Lazy registries (lora_merge.plugins): an ordinary merge of two SD LoRAs imports neither the toy world nor
model mode; a built-in plug-in is loaded by the first lookup it declares it can answer (a toy-world LoRA's
metadata, the name ``toyworld``), and its declaration matches what it registers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import lora_file_from_shapes

import lora_merge

TOY_LORAS = Path(lora_merge.__file__).parent / "data" / "toyworld" / "loras"
HEAVY = "('lora_merge.toyworld', 'lora_merge.model_mode')"

#: an SD 1.x UNet LoRA: cross-attention 768 wide (CLIP ViT-L), as kohya names it
SD15 = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640),
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (640, 768),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v": (1280, 768),
    "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0": (1280, 1280),
}


def _kohya(name: str) -> tuple[str, str, str]:
    k = "lora_unet_" + name.removeprefix("unet.").replace(".", "_")
    return f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"


def _merge_in_a_fresh_interpreter(inputs, out: Path, *extra: str) -> dict:
    code = f"""
        import json, sys
        from lora_merge.cli import main
        try:
            main([ "merge", *{[str(p) for p in inputs]!r}, "-o", {str(out)!r}, *{list(extra)!r}])
        except SystemExit as exc:
            code = exc.code
        from lora_merge import plugins
        from safetensors import safe_open
        recipe = json.loads(safe_open({str(out)!r}, "pt").metadata()["lora_merge.recipe"])
        print(json.dumps({{"exit": code, "arch": recipe["arch"], "plugins": plugins.loaded(),
                          "heavy": sorted(m for m in sys.modules if m.startswith({HEAVY}))}}))
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_merging_two_sd_loras_imports_no_toyworld_and_no_model_mode(tmp_path):
    a = lora_file_from_shapes(tmp_path / "a.safetensors", SD15, _kohya, seed=1)
    b = lora_file_from_shapes(tmp_path / "b.safetensors", SD15, _kohya, seed=2)
    got = _merge_in_a_fresh_interpreter([a, b], tmp_path / "out.safetensors")
    assert got["exit"] == 0 and got["arch"] == "sd1"
    assert got["heavy"] == [] and got["plugins"] == []


def test_merging_loras_of_no_known_family_loads_no_plugin_either(tmp_path):
    partial = {"unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q": (8, 8)}
    a = lora_file_from_shapes(tmp_path / "a.safetensors", partial, _kohya, seed=1)
    b = lora_file_from_shapes(tmp_path / "b.safetensors", partial, _kohya, seed=2)
    got = _merge_in_a_fresh_interpreter([a, b], tmp_path / "out.safetensors")
    assert got["exit"] == 0 and got["arch"] is None and got["heavy"] == [] and got["plugins"] == []


def test_merging_toyworld_loras_still_detects_the_toy_world(tmp_path):
    pytest.importorskip("diffusers")
    got = _merge_in_a_fresh_interpreter([TOY_LORAS / "sks.safetensors", TOY_LORAS / "zkz.safetensors"],
                                        tmp_path / "out.safetensors")
    assert got["exit"] == 0 and got["arch"] == "toyworld"
    assert got["plugins"] == ["lora_merge.toyworld.plugin"]


def test_a_lookup_of_a_declared_name_loads_only_then():
    pytest.importorskip("diffusers")
    code = f"""
        import sys
        from lora_merge import arch, plugins
        from lora_merge.priors import load_priors
        heavy = lambda: sorted(m for m in sys.modules if m.startswith({HEAVY}))
        assert arch.block_resolutions("sdxl") and arch.block_resolutions("no-such-arch") is None
        assert load_priors("b-lora").name == "b-lora"
        assert heavy() == [] and plugins.loaded() == [], (heavy(), plugins.loaded())
        assert arch.native_latent("toyworld") == 16
        assert plugins.loaded() == ["lora_merge.toyworld.plugin"]
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_builtin_plugin_declarations_match_what_they_register():
    pytest.importorskip("diffusers")
    code = """
        from lora_merge import families, plugins
        from lora_merge.model_mode.base_model import _NAMED_MODELS
        from lora_merge.model_mode.images import _SOURCES
        from lora_merge.priors import table

        for plugin in plugins.BUILTIN_PLUGINS:
            before = {"arch": set(families.names()), "base_model": set(_NAMED_MODELS),
                      "image_source": set(_SOURCES), "priors": set(table._BUILTIN)}
            plugins._load_builtin(plugin)
            after = {"arch": set(families.names()), "base_model": set(_NAMED_MODELS),
                     "image_source": set(_SOURCES), "priors": set(table._BUILTIN)}
            for registry in after:
                new = after[registry] - before[registry]
                assert all(plugin.fills(registry, n) for n in new), (plugin, registry, new)
            for registry, declared in plugin.provides.items():
                exact = {n for n in declared if not n.endswith("*")}
                have = after[registry] | (set(table._family_tables()) if registry == "priors" else set())
                assert exact <= have, (plugin, registry, exact - have)
                assert all(any(h.startswith(n[:-1]) for h in have) for n in declared if n.endswith("*"))
    """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_toyworld_claim_is_its_detection_rule():
    pytest.importorskip("diffusers")
    from lora_merge import Adapter, plugins
    from lora_merge.toyworld.plugin import is_toyworld

    (toy,) = plugins.BUILTIN_PLUGINS
    for md in ({"modelspec.architecture": "lora-merge/toyworld"}, {"modelspec.architecture": "sdxl"}, {}):
        assert toy.claims_metadata(md) == is_toyworld(Adapter(metadata=md))
