"""The model-mode cost scripts run end to end, tiny, on CPU (no speed is asserted: timings are benchmarks'
business, docs/benchmarks.md): ``benchmarks/sdxl_duolora_gpu.py`` on its SDXL-shaped tiny UNet for two
DuoLoRA steps, and ``benchmarks/model_mode_cost.py`` for one round.  The real SDXL config is checked by its
parameter count (on the meta device)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sdxl_config_is_the_sdxl_base_unet():
    sx = _load("sdxl_duolora_gpu")
    assert sx.count_parameters(sx.SDXL_UNET_CONFIG) == sx.SDXL_UNET_PARAMS == 2_567_463_684
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sx.SDXL_UNET_CONFIG)
    attn = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attn" in n
            and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]  # fmt: skip
    assert len(attn) == 560


def test_sdxl_gpu_script_runs_tiny_on_cpu(capsys, tmp_path):
    sx = _load("sdxl_duolora_gpu")
    out = tmp_path / "r.json"
    assert sx.main(["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "2",
                    "--resolution", "64", "--json", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    for field in ("seconds_per_step:", "total_minutes_100_steps:", "wall_minutes:", "peak_gpu_memory_gib:"):
        assert field in text
    res = json.loads(out.read_text())
    assert res["steps"] == 2 and res["timed_steps"] == 1 and res["seconds_per_step"] > 0
    assert res["latent"] == [4, 8, 8] and res["constyle"] is True
    # the full DuoLoRA objective ran: ZipRank + priors + both Constyle cycles
    assert {"content", "style", "sim", "prior", "cycle", "rev"} <= set(res["loss_terms"])
    assert res["peak_gpu_memory_gib"] is None  # CPU


def test_cost_script_runs_one_round(capsys, tmp_path):
    mc = _load("model_mode_cost")
    out = tmp_path / "c.json"
    assert mc.main(["--config", "tiny", "--steps", "3", "--rounds", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    cases = [r["case"] for r in res["table"]]
    assert cases == ["plain", "ziplora", "duolora", "duolora+constyle"]
    assert all(r["ms_per_step"] > 0 for r in res["table"]) and res["table"][0]["ratio_vs_plain"] == 1.0
    for case in cases:
        assert f"round 1/1 {case}" in text
    # trainable values: ZipLoRA's output masks vs DuoLoRA's rank masks
    by = {r["case"]: r for r in res["table"]}
    assert by["ziplora"]["trainable_values"] > by["duolora"]["trainable_values"] == by["duolora+constyle"][
        "trainable_values"]
