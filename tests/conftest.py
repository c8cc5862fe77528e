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
