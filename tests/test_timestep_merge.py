"""timestep-split (lora_merge/sampling_time/timestep_split.py): the phase follows the real timestep of any scheduler, the
hooked output equals the weights with each phase's ΔW folded in, detach restores, bad settings fail."""
from __future__ import annotations

import pytest
import torch
from test_klora import SCHED, _adapter, _folded, _inputs, unet  # noqa: F401  (unet: the fixture)

from lora_merge.errors import UsageError
from lora_merge.sampling_time import available_sampling_time, build
from lora_merge.timestep_merge import TimestepSplit

diffusers = pytest.importorskip("diffusers")


def _out(model, t):
    with torch.no_grad():
        return model(timestep=torch.tensor(t), **_inputs()).sample.double()


def test_phase_follows_the_schedulers_timesteps(unet):  # noqa: F811
    c, s = _adapter(unet, 2, 1), _adapter(unet, 3, 2)
    for cls in (diffusers.DDIMScheduler, diffusers.EulerDiscreteScheduler):
        for steps in (10, 25, 50):
            sched = cls(**SCHED)
            sched.set_timesteps(steps)
            m = TimestepSplit(c, s, switch=0.4)
            with m.attach(unet, scheduler=sched):
                for t in sched.timesteps:
                    _out(unet, float(t))
            phases = [next(iter(r.choices.values())) for r in m.records]
            want = ["early" if 1 - float(t) / 1000 < 0.4 else "late" for t in sched.timesteps]
            assert phases == want and "early" in phases and "late" in phases


def test_output_equals_each_phase_folded_and_detach_restores(unet):  # noqa: F811
    c, s = _adapter(unet, 2, 1, scale=0.2), _adapter(unet, 3, 2, scale=0.2)
    base_early, base_late = _out(unet, 900.0), _out(unet, 100.0)
    m = TimestepSplit.attach(unet, c, s, switch=0.5, early=(1.0, 0.0), late=(0.5, 1.0))
    try:
        early, late = _out(unet, 900.0), _out(unet, 100.0)
    finally:
        m.detach()
    torch.testing.assert_close(early, _out(_folded(unet, c), 900.0), rtol=1e-4, atol=1e-5)
    both = _folded(_folded(unet, c, 0.5), s)
    torch.testing.assert_close(late, _out(both, 100.0), rtol=1e-4, atol=1e-5)
    assert torch.equal(_out(unet, 900.0), base_early) and torch.equal(_out(unet, 100.0), base_late)


def test_listed_and_built_by_name_and_bad_settings_fail(unet):  # noqa: F811
    assert available_sampling_time()["timestep-split"] is TimestepSplit
    c, s = _adapter(unet, 2, 1), _adapter(unet, 2, 2)
    assert isinstance(build("timestep-split", c, s, switch=0.3), TimestepSplit)
    with pytest.raises(UsageError, match="switch"):
        TimestepSplit(c, s, switch=1.5)
    with pytest.raises(UsageError, match="two strengths"):
        TimestepSplit(c, s, early=(1.0,))
    with pytest.raises(UsageError, match="unknown sampling-time merger"):
        build("nope", c, s)
