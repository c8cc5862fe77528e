"""Plug-ins.  The registries below the floors that fill them (lora_merge.plugins): the toy world registers
itself like a third-party package, and an entry point of the group ``lora_merge.plugins`` is loaded on
first lookup.  A strategy from outside the package, registered through a real ``lora_merge.strategies``
entry point (a dist-info folder on PYTHONPATH, as ``pip install`` would leave it), runs from the CLI.  The
plug-in example of docs/strategies.md runs as written and merges to the sum it states."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule

STRATEGIES_MD = Path(__file__).resolve().parents[1] / "docs" / "strategies.md"


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip


def _cli(args, env) -> subprocess.CompletedProcess:
    """``lora-merge ARGS`` in a fresh interpreter."""
    code = "import sys; from lora_merge.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip


def _dist_info(root: Path, dist: str, entry_points: str) -> None:
    """A ``<dist>-0.1.dist-info`` folder with ``entry_points.txt``, as ``pip install`` leaves one."""
    folder = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    folder.mkdir()
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (folder / "entry_points.txt").write_text(entry_points)


def _env(root: Path) -> dict:
    """This environment with ``root`` first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _adapter_pair(seed=0, name="unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"):
    """Two in-memory SD-style LoRAs of one attention module (ranks 4 and 3, different alphas)."""
    g = torch.Generator().manual_seed(seed)
    ads = []
    for r, alpha in ((4, 2.0), (3, 6.0)):
        ad = Adapter(dialect="diffusers")
        ad.modules[name] = LoraModule.from_tensors(
            name, torch.randn(r, 16, generator=g), torch.randn(16, r, generator=g), alpha
        )
        ads.append(ad)
    return ads, name


# ---------------------------------------------------------------- registries filled by plug-ins
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


REGISTRY_PLUGIN = '''
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
    (tmp_path / "lm_demo_plugin.py").write_text(REGISTRY_PLUGIN)
    (tmp_path / "lm_broken_plugin.py").write_text("raise RuntimeError('broken on purpose')\n")
    _dist_info(tmp_path, "lm-demo-plugin",
               "[lora_merge.plugins]\ndemo = lm_demo_plugin\nbroken = lm_broken_plugin\n")  # fmt: skip
    env = _env(tmp_path)
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


# ---------------------------------------------------------------- a strategy from an entry point
STRATEGY_PLUGIN = textwrap.dedent(
    '''
    from lora_merge.strategies import LayerResult, MergeStrategy, Param


    class FirstOnly(MergeStrategy):
        """Keeps input 1's update scaled by --gain; a third-party strategy for the plug-in test."""

        name = "first-only"
        description = "input 1 times a gain"
        reference = "test plug-in"
        exact = True
        params = (Param("gain", float, 1.0, "multiplier", range=(0.0, None)),)

        def merge_layer(self, inputs, ctx):
            x = inputs[0]
            return LayerResult(up=x.up * (x.coeff * self.gain), down=x.down, info={"gain": self.gain})
    '''
)


def test_entry_point_strategy_runs_from_cli(tmp_path):
    plug = tmp_path / "site"
    plug.mkdir()
    (plug / "lm_first_only.py").write_text(STRATEGY_PLUGIN)
    _dist_info(plug, "lm-first-only", "[lora_merge.strategies]\nfirst-only = lm_first_only:FirstOnly\n")
    env = _env(plug)
    ads, n = _adapter_pair(seed=0)
    paths = [lm.save(ad, tmp_path / f"in{i}.safetensors") for i, ad in enumerate(ads)]

    listed = _cli(["strategies", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    assert "first-only" in {s["name"] for s in json.loads(listed.stdout)}

    help_ = _cli(["merge", "--help"], env)
    assert "first-only" in help_.stdout  # the plug-in's strategy is listed; its parameter became an option
    assert "--gain" in _cli(["strategies", "first-only"], env).stdout  # (listed by `strategies NAME`)

    out = tmp_path / "out.safetensors"
    run = _cli(
        ["merge", *paths, "-o", out, "--strategy", "first-only", "--gain", "3", "--weights", "0.5,1"], env
    )
    assert run.returncode == 0, run.stderr
    merged = lm.load(out)
    src = lm.load(paths[0])
    torch.testing.assert_close(merged[n].delta(), 3 * 0.5 * src[n].delta(), rtol=1e-5, atol=1e-6)
    assert json.loads(merged.metadata["lora_merge.recipe"])["params"] == {"gain": 3.0}

    wrong = _cli(["merge", *paths, "-o", tmp_path / "x.safetensors", "--gain", "3"], env)
    assert wrong.returncode == 2 and "--gain" in wrong.stderr and "linear" in wrong.stderr

    # without the dist-info on the path the strategy does not exist
    bare = _cli(
        ["merge", *paths, "-o", tmp_path / "y.safetensors", "--strategy", "first-only"], dict(os.environ)
    )
    assert bare.returncode == 2 and "unknown strategy 'first-only'" in bare.stderr


# ---------------------------------------------------------------- the plug-in guide's example
def _doc_example() -> str:
    """The fenced python block of docs/strategies.md whose first line is ``# plug-in example``."""
    blocks = re.findall(r"^```python\n(.*?)^```", STRATEGIES_MD.read_text(), re.DOTALL | re.MULTILINE)
    found = [b for b in blocks if b.startswith("# plug-in example")]
    assert len(found) == 1, "docs/strategies.md needs one python block starting with '# plug-in example'"
    return found[0]


def test_the_plugin_guide_example_merges_to_the_scaled_weighted_sum(tmp_path, monkeypatch):
    from lora_merge import strategies

    strategies.available_strategies()  # built-ins and entry points loaded, so the copy below holds them
    # the example registers itself: into a copy of the registry, dropped at the end of the test
    monkeypatch.setattr(strategies.REGISTRY, "classes", dict(strategies.REGISTRY.classes))
    ns: dict = {"__name__": "scaled_sum"}
    exec(compile(_doc_example(), str(STRATEGIES_MD), "exec"), ns)  # noqa: S102 - the documented example
    cls = ns["ScaledSum"]
    assert strategies.get_strategy("scaled-sum") is cls
    assert [p.name for p in cls.params] == ["gain"]

    (a, b), n = _adapter_pair(seed=3)
    want = 0.5 * (0.7 * a[n].delta() + 0.2 * b[n].delta())
    # by name, from files, with its parameter through params=
    pa, pb = lm.save(a, tmp_path / "a.safetensors"), lm.save(b, tmp_path / "b.safetensors")
    res = lm.merge([pa, pb], tmp_path / "m.safetensors", strategy="scaled-sum", params={"gain": 0.5},
                   weights=[0.7, 0.2])  # fmt: skip
    torch.testing.assert_close(lm.load(res.output)[n].delta(), want, rtol=1e-5, atol=1e-6)
    assert res.adapter[n].rank == 7  # exact: the factors concatenated
    assert json.loads(lm.load(res.output).metadata["lora_merge.recipe"])["params"] == {"gain": 0.5}
    # a configured instance, in memory
    strat = cls(gain=0.5)
    assert strat.gain == 0.5 == strat.config["gain"]
    res = lm.merge([a, b], strategy=strat, weights=[0.7, 0.2])
    torch.testing.assert_close(res.adapter[n].delta(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(lm.errors.UsageError, match="gain"):
        cls(gain=-1.0)
