"""The sampling-time mergers as declared classes: the listing (CLI, --json, the torch-free catalogue) and
the constructors' defaults come from each class's ``Param`` tuple; a merger registered in-process or
through the ``lora_merge.sampling_time`` entry point is listed, built and refused by ``merge``; a broken
entry point warns once and the others load, the same way in the strategies' registry."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from lora_merge.adapter import Adapter, LoraModule
from lora_merge.cli.fast import load_catalogue
from lora_merge.cli.merge_cmd import merge
from lora_merge.cli.strategies_cmd import strategies
from lora_merge.errors import UsageError
from lora_merge.sampling_time import (
    KLoRA,
    SamplingTimeMerger,
    TimestepSplit,
    available_sampling_time,
    build,
    get_sampling_time,
    register_sampling_time,
    registry,
)

torch.set_num_threads(1)

#: a third-party merger, as docs/strategies.md writes one
MERGER_SOURCE = '''
from lora_merge.sampling_time import (NUM_TRAIN_TIMESTEPS, WEIGHTS, SamplingTimeMerger, StepRecord,
                                      denoising_progress, lora_output)
from lora_merge.strategies import Param


class StyleLate(SamplingTimeMerger):
    name = "style-late"
    description = "the content LoRA alone, then the style LoRA alone from `start` on"
    reference = "an example"
    params = (Param("start", float, 0.5, "fraction of the denoising", range=(0.0, 1.0)),
              WEIGHTS, NUM_TRAIN_TIMESTEPS)

    def step_record(self, t):
        late = denoising_progress(t, self.T) >= self.config["start"]
        return StepRecord(t, denoising_progress(t, self.T), 0.0,
                          dict.fromkeys(self.layers, "style" if late else "content"))

    def layer_extra(self, layer, record, x):
        concept = record.choices[layer.name]
        return lora_output(layer, concept, x) if concept in layer.bound else x.new_zeros(())
'''


def _declared(p) -> dict:
    """A Param as the listing must show it, straight from the declaration."""
    default = list(p.default) if isinstance(p.default, tuple) else p.default
    return {"name": p.name, "type": p.type.__name__, "default": default, "help": p.help,
            "range": list(p.range) if p.range else None, "choices": list(p.choices) if p.choices else None}


def _adapter(seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="diffusers")
    ad.modules["unet.a"] = LoraModule.from_tensors("unet.a", torch.randn(2, 6, generator=g),
                                                   torch.randn(6, 2, generator=g), 2.0)
    return ad


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x, timestep):
        return self.a(x)


def _style_late():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "strategies.md").read_text(encoding="utf-8")
    assert MERGER_SOURCE.strip() in doc  # the example docs/strategies.md shows
    ns: dict = {"__name__": "style_late_example"}
    exec(compile(MERGER_SOURCE, "style_late", "exec"), ns)  # noqa: S102 - the documented example, verbatim
    return ns["StyleLate"]


# ------------------------------------------------------------------------------------------ the listing
@pytest.mark.parametrize("name", ["k-lora", "timestep-split"])
def test_listing_shows_the_declared_params(name):
    cls = get_sampling_time(name)
    r = CliRunner()
    one = json.loads(r.invoke(strategies, [name, "--json"]).output)
    assert one["params"] == [_declared(p) for p in cls.params]
    assert one["static_file"] is False and one["name"] == name and f"{cls.__name__}.attach" in one["api"]
    listed = json.loads(r.invoke(strategies, ["--sampling-time", "--json"]).output)["sampling_time"]
    assert [i["name"] for i in listed] == list(available_sampling_time())[: len(listed)]
    assert next(i for i in listed if i["name"] == name) == one
    cat = next(i for i in load_catalogue()["sampling_time"] if i["name"] == name)  # the fast path's copy
    assert cat["params"] == [_declared(p) for p in cls.params]
    text = r.invoke(strategies, [name], env={"COLUMNS": "200"}).output
    assert all(p.name in text for p in cls.params) and "cannot be saved" in text


# ------------------------------------------------------------------------------------------ the declaration
def test_constructor_defaults_and_values_come_from_the_params():
    c, s = _adapter(1), _adapter(2)
    for cls in (KLoRA, TimestepSplit):
        m = cls(c, s)
        assert m.config == {p.name: p.default for p in cls.params}
        sig = inspect.signature(cls).parameters
        assert all(sig[p.name].default == p.default for p in cls.params)
    ts = TimestepSplit(c, s, early="1,0.5", late=[0.25, 1], weights=(2, 1))
    assert ts.early == (1.0, 0.5) and ts.late == (0.25, 1.0) and ts.weights == (2.0, 1.0)
    assert KLoRA(c, s, gamma="0.5").gamma == 0.5 and KLoRA(c, s).config["gamma"] == "auto"
    with pytest.raises(UsageError, match="no parameter 'swtich'.*switch"):
        TimestepSplit(c, s, swtich=0.5)
    with pytest.raises(UsageError, match="'gamma' takes a number or 'auto'"):
        KLoRA(c, s, gamma="big")
    with pytest.raises(UsageError, match="'late' takes two strengths"):
        TimestepSplit(c, s, late="1,2,3")


# ------------------------------------------------------------------------------------------ plug-ins
def test_a_registered_merger_is_listed_built_and_refused_by_merge(monkeypatch, tmp_path):
    monkeypatch.setattr(registry.REGISTRY, "classes", dict(registry.REGISTRY.classes))
    StyleLate = register_sampling_time(_style_late())
    assert issubclass(StyleLate, SamplingTimeMerger)
    assert list(available_sampling_time())[:2] == ["k-lora", "timestep-split"]  # built-ins first
    r = CliRunner()
    listed = json.loads(r.invoke(strategies, ["--sampling-time", "--json"]).output)["sampling_time"]
    mine = next(i for i in listed if i["name"] == "style-late")
    assert mine["params"] == [_declared(p) for p in StyleLate.params]
    assert "style-late" in r.invoke(strategies, [], env={"COLUMNS": "200"}).output
    assert "style-late" not in {i["name"] for i in json.loads(r.invoke(strategies, ["--json"]).output)}

    c, s = _adapter(3), _adapter(4)
    model = _Model()
    x = torch.randn(3, 6)
    with torch.no_grad():
        base = model(x, 900)
        with build("style-late", c, s, start=0.3).attach(model) as m:
            early, late = model(x, 900), model(x, 100)  # p = 0.1, then 0.9
    assert [r.choices["a"] for r in m.records] == ["content", "style"]
    torch.testing.assert_close(early, base + x @ c["unet.a"].delta(torch.float32).T)
    torch.testing.assert_close(late, base + x @ s["unet.a"].delta(torch.float32).T)
    with torch.no_grad():
        assert torch.equal(model(x, 100), base)  # detached

    res = r.invoke(merge, ["a.safetensors", "b.safetensors", "-s", "style-late", "-o", str(tmp_path / "o.st")])
    assert isinstance(res.exception, UsageError) and "\n" not in str(res.exception)
    assert "sampling-time method" in str(res.exception) and "StyleLate.attach" in str(res.exception)
    with pytest.raises(UsageError, match="unknown sampling-time merger 'nope'; available: .*style-late"):
        get_sampling_time("nope")


STRATEGY_SOURCE = '''
from lora_merge.strategies import LayerResult, MergeStrategy, Param


class FirstOnly(MergeStrategy):
    name = "first-only"
    description = "input 1"
    exact = True
    params = (Param("gain", float, 1.0, "multiplier"),)

    def merge_layer(self, inputs, ctx):
        return LayerResult(up=inputs[0].up * inputs[0].coeff, down=inputs[0].down)


NOT_A_CLASS = 42
'''

ENTRY_POINTS = """\
[lora_merge.strategies]
first-only = lm_st_plugins:FirstOnly
import-fails = lm_st_missing:Thing
wrong-kind = lm_st_plugins:NOT_A_CLASS

[lora_merge.sampling_time]
style-late = lm_st_plugins:StyleLate
import-fails = lm_st_missing:Thing
wrong-kind = lm_st_plugins:FirstOnly
"""

WARNING = re.compile(r"^lora-merge (strategy|sampling-time merger) plug-in (\S+) \((\S+)\) failed to load: .+$")


def _install(root):
    (root / "lm_st_plugins.py").write_text(MERGER_SOURCE + STRATEGY_SOURCE)
    dist = root / "lm_st_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lm-st-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_broken_entry_points_warn_once_and_the_rest_load_in_both_registries(tmp_path):
    env = _install(tmp_path)
    code = textwrap.dedent("""
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from lora_merge.sampling_time import available_sampling_time
            from lora_merge.strategies import available_strategies
            for _ in range(2):  # a second lookup loads nothing again
                st, ss = list(available_strategies()), list(available_sampling_time())
        from lora_merge import plugins
        print(json.dumps({"strategies": st, "sampling_time": ss, "failed": sorted(plugins.failed()),
                          "warnings": [[w.category.__name__, str(w.message)] for w in caught
                                       if "plug-in" in str(w.message)]}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert "first-only" in out["strategies"] and "linear" in out["strategies"]
    assert out["sampling_time"] == ["k-lora", "timestep-split", "style-late"]
    shapes = []
    for category, msg in out["warnings"]:
        m = WARNING.match(msg)
        assert category == "RuntimeWarning" and m, msg
        shapes.append((m.group(1), m.group(2)))
    # each broken entry point once, the same two failures in each registry
    assert sorted(shapes) == sorted((kind, name) for kind in ("strategy", "sampling-time merger")
                                    for name in ("import-fails", "wrong-kind"))
    assert len(out["failed"]) == 4

    listed = subprocess.run([sys.executable, "-c", "from lora_merge.cli import main; main()", "strategies",
                             "--sampling-time", "--json"], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert listed.returncode == 0, listed.stderr
    assert "style-late" in [i["name"] for i in json.loads(listed.stdout)["sampling_time"]]
    assert listed.stderr.count("sampling-time merger plug-in") == 2  # warned, not fatal
