"""Shared test helpers.  Real-world fixtures live in ../shared/fixtures; tests that need them skip
cleanly when that folder is absent (a user's machine)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"

SD15_FILES = ["pokemon_style", "rick_and_morty_style", "course3_unet_prefixed", "sd_lora_2100"]
PEFT_DIRS = ["distilbert_emotion", "distilbert_imdb", "gpt2_tigrinya"]

# Every tensor in the suite is tiny: one torch thread is faster than two (no spin-waiting, and on a busy
# 2-core machine two threads made small QRs and UNet forwards 20-100x slower) and keeps results stable.
torch.set_num_threads(1)


def run_cli(argv, capsys):
    """Run ``lora-merge ARGV`` in-process with warnings silenced; returns ``(exit code, stdout, stderr)``."""
    import warnings

    from lora_merge.cli import main

    with pytest.raises(SystemExit) as exc, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(list(map(str, argv)))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def shared_fixture(rel: str) -> Path:
    """Path of a file under ../shared/fixtures, or skip the test when it is not there."""
    p = SHARED_FIXTURES / rel
    if not p.exists():
        pytest.skip(f"real-world fixture {rel} not available (../shared/fixtures missing)")
    return p


@pytest.fixture
def sd15_fixture():
    return lambda name: shared_fixture(f"sd15/{name}.safetensors")


@pytest.fixture
def peft_fixture():
    return lambda name: shared_fixture(f"peft/{name}")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def check_diffusers_loads(model, ref, pipeline_cls, lora_file, inputs: dict) -> None:
    """diffusers' own path (``Pipeline.lora_state_dict`` + ``load_lora_adapter``) loads ``lora_file`` into
    ``model`` and its outputs equal ``ref``'s (the base model with ``W + ΔW`` folded in), and the LoRA does
    something."""
    import warnings

    with torch.no_grad():
        want, base = ref(**inputs)[0], model(**inputs)[0]
    state, metadata = pipeline_cls.lora_state_dict(str(lora_file), return_lora_metadata=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_lora_adapter(state, prefix="transformer", adapter_name="ours", metadata=metadata)
    with torch.no_grad():
        got = model(**inputs)[0]
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.fixture
def diffusers_loads():
    return check_diffusers_loads


def lora_file_from_shapes(path, shapes: dict, key, rank: int = 2, seed: int = 0, alpha: bool = True):
    """A LoRA file with random factors for ``{module: (out, in)}``; ``key(module)`` gives its
    ``(down key, up key, alpha key)``; alphas ``rank·(1 + j mod 3)``."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for j, (name, (o, i)) in enumerate(shapes.items()):
        down, up, a = key(name.removeprefix("transformer."))
        sd[down] = torch.randn(rank, i, generator=g) / i**0.5
        sd[up] = torch.randn(o, rank, generator=g) * 0.1
        if alpha and a:
            sd[a] = torch.tensor(float(rank * (1 + j % 3)))
    save_file(sd, str(path))
    return path


@pytest.fixture
def lora_file():
    return lora_file_from_shapes
