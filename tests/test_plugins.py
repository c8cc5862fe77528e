"""The registries below the floors that fill them (lora_merge.plugins): the toy world registers itself like a
third-party package, and an entry point of the group ``lora_merge.plugins`` is loaded on first lookup."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip


def test_importing_the_core_loads_no_plugin():
    res = _run(
        """
        import sys
        import lora_merge, lora_merge.arch, lora_merge.priors, lora_merge.model_mode.base_model
        from lora_merge import plugins
        assert plugins.loaded() == [], plugins.loaded()
        assert not any(m.startswith("lora_merge.toyworld") for m in sys.modules)
        """
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_toy_world_registers_its_model_images_priors_and_arch():
    pytest.importorskip("diffusers")
    from lora_merge import arch, plugins
    from lora_merge.model_mode.base_model import base_model_names
    from lora_merge.model_mode.images import image_source_names, load_image_source, resolve_images
    from lora_merge.priors import builtin_priors, load_priors

    assert "toyworld" in base_model_names()
    assert "lora_merge.toyworld.plugin" in plugins.loaded()
    assert {"toyworld:content", "toyworld:style", "toyworld:tqk", "toyworld:mrv"} <= set(image_source_names())
    imgs, captions = load_image_source("toyworld:style", 8, n=3, seed=0)
    assert imgs.shape == (3, 3, 8, 8) and len(captions) == 3 and all("zkz" in c for c in captions)
    assert resolve_images("toyworld:content", 16).shape == (6, 3, 16, 16)  # the 6 DreamBooth photos
    assert resolve_images("toyworld:mrv", 16).shape == (64, 3, 16, 16)  # 64 augmentations of one image
    from lora_merge.errors import UsageError

    with pytest.raises(UsageError, match="toyworld:content"):
        resolve_images("toyworld:shapes", 16)
    assert "toyworld" in builtin_priors()
    table = load_priors("auto", "toyworld")
    assert table.role_of("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k") == "content"
    assert table.role_of("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == "style"
    assert arch.block_resolutions("toyworld")["down_blocks.2"] == 4 and arch.native_latent("toyworld") == 16
    assert arch.arch_name("toyworld").startswith("lora-merge toy world")


PLUGIN = '''
from lora_merge.arch import register_arch
from lora_merge.priors import priors_from_resolutions, register_priors

CALLS = []


def register():
    CALLS.append(1)
    register_arch("demo-arch", "a demo architecture", block_resolutions={"down_blocks.0": 8, "mid_block": 2},
                  native_latent=8, detect=lambda ad: (ad.metadata or {}).get("arch") == "demo")
    register_priors("demo-arch", lambda: priors_from_resolutions("demo-arch", {"down_blocks.0": 8, "mid_block": 2}, 8))
'''


def test_an_entry_point_plugin_is_loaded_on_first_lookup(tmp_path):
    (tmp_path / "lm_demo_plugin.py").write_text(PLUGIN)
    (tmp_path / "lm_broken_plugin.py").write_text("raise RuntimeError('broken on purpose')\n")
    dist = tmp_path / "lm_demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lm-demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[lora_merge.plugins]\ndemo = lm_demo_plugin\nbroken = lm_broken_plugin\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    res = _run(
        """
        import warnings
        warnings.simplefilter("always")
        from lora_merge import Adapter, arch, plugins
        from lora_merge.priors import load_priors
        import lm_demo_plugin
        assert lm_demo_plugin.CALLS == []  # nothing registered before a lookup
        assert arch.guess_arch(Adapter(metadata={"arch": "demo"})) == "demo-arch"
        assert lm_demo_plugin.CALLS == [1]
        assert arch.resolution_of("unet.mid_block.attentions.0.to_q", "demo-arch") == 2
        assert load_priors("auto", "demo-arch").role_of("unet.mid_block.attentions.0.to_q") == "content"
        assert any("demo" in p for p in plugins.loaded()), plugins.loaded()
        assert "broken on purpose" in " ".join(plugins.failed().values())
        plugins.load_all()
        assert lm_demo_plugin.CALLS == [1]  # loaded once
        """,
        env,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken_plugin" in res.stderr or "broken" in res.stderr  # reported as a warning
