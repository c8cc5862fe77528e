"""A strategy from outside the package, registered through a real ``lora_merge.strategies`` entry point
(a dist-info folder on PYTHONPATH, as ``pip install`` would leave it), runs from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule

PLUGIN = textwrap.dedent(
    '''
    from lora_merge.strategies import LayerResult, MergeStrategy, Param
    from lora_merge import linalg


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


def _install_plugin(root):
    (root / "lm_first_only.py").write_text(PLUGIN)
    dist = root / "lm_first_only-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lm-first-only\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lora_merge.strategies]\nfirst-only = lm_first_only:FirstOnly\n")


def _env(root):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _cli(args, env):
    code = "import sys; from lora_merge.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_entry_point_strategy_runs_from_cli(tmp_path):
    plug = tmp_path / "site"
    plug.mkdir()
    _install_plugin(plug)
    env = _env(plug)
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        ad = Adapter(dialect="diffusers")
        n = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
        ad.modules[n] = LoraModule.from_tensors(
            n, torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g), 2.0
        )
        paths.append(lm.save(ad, tmp_path / f"in{i}.safetensors"))

    listed = _cli(["strategies", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    assert "first-only" in {s["name"] for s in json.loads(listed.stdout)}

    help_ = _cli(["merge", "--help"], env)
    assert "--gain" in help_.stdout  # the plug-in's parameter became an option

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
