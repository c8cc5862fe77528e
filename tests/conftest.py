"""Shared test helpers.

Real-world fixtures: seven LoRA adapters published by other people (tests/data/README.md names them and
their source repositories).  The files are not part of this repository; ``shared_fixture(rel)`` returns
the real file when the maintainers' fixtures folder is next to the checkout, and otherwise a look-alike
generated from ``tests/data/fixture_shapes.json``: the same tensor keys, shapes, dtypes, safetensors
metadata and ``adapter_config.json``, with seeded random values at each tensor's recorded mean and
standard deviation, written once per test session under pytest's temporary folder.

``LORA_MERGE_TEST_FIXTURES`` picks the source: ``auto`` (the default: real when present, else generated),
``generated`` (always the look-alikes, to check a fresh clone's run on a maintainer's machine) or ``real``
(the real files; a test that needs one fails when they are absent).
"""
from __future__ import annotations

import json
import os
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: the maintainers' folder of real files (absent from a clone); tests go through ``shared_fixture``
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
FIXTURE_MANIFEST = REPO / "tests" / "data" / "fixture_shapes.json"
FIXTURES_ENV = "LORA_MERGE_TEST_FIXTURES"

SD15_FILES = ["pokemon_style", "rick_and_morty_style", "course3_unet_prefixed", "sd_lora_2100"]
PEFT_DIRS = ["distilbert_emotion", "distilbert_imdb", "gpt2_tigrinya"]

#: the environment a worker of ``pytest -n N`` (pytest-xdist) takes from the pytest that started it: the
#: workers otherwise run with ``COLUMNS=80 LINES=24``, and the CLI's tables then fold where a plain
#: ``pytest`` run (no terminal, no COLUMNS) prints them 160 wide
_TERMINAL_ENV = ("COLUMNS", "LINES")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # xdist controller, before each worker starts
    node.workerinput["lora_merge_terminal_env"] = {k: os.environ.get(k) for k in _TERMINAL_ENV}


def pytest_configure(config):
    env = getattr(config, "workerinput", {}).get("lora_merge_terminal_env")
    for key, value in (env or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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


def fixtures_source() -> str:
    """``"real"`` or ``"generated"``: where ``shared_fixture`` takes its files from in this run."""
    mode = os.environ.get(FIXTURES_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "real", "generated"):
        raise pytest.UsageError(f"{FIXTURES_ENV}={mode!r}: expected auto, real or generated")
    if mode == "auto":
        return "real" if SHARED_FIXTURES.is_dir() else "generated"
    return mode


_GENERATED: dict[str, Path] = {}
_TMP_FACTORY: list = []  # the session's pytest.TempPathFactory (set by the autouse session fixture below)


@pytest.fixture(scope="session", autouse=True)
def _fixture_tmp_factory(tmp_path_factory):
    _TMP_FACTORY[:] = [tmp_path_factory]
    yield
    _TMP_FACTORY.clear()
    _GENERATED.clear()


def _manifest() -> dict:
    return json.loads(FIXTURE_MANIFEST.read_text())["fixtures"]


def _write_lookalike_safetensors(path: Path, desc: dict, seed_name: str) -> None:
    """Every tensor of ``desc`` as Gaussian values, seeded by file and key, shifted and scaled to exactly
    the recorded mean and standard deviation; the recorded metadata."""
    from safetensors.torch import save_file

    tensors = {}
    for key, t in desc["tensors"].items():
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed_name}:{key}".encode()))
        x = torch.randn(t["shape"], generator=g, dtype=torch.float64)
        if x.numel() > 1:
            x = (x - x.mean()) / x.std()
        x = x * t["std"] + t["mean"]
        tensors[key] = x.to(getattr(torch, t["dtype"])).contiguous()
    save_file(tensors, str(path), metadata=desc["metadata"] or None)


def generated_fixture(rel: str, root: Path | None = None) -> Path:
    """The look-alike of fixture ``rel`` (``sd15/<name>.safetensors`` or ``peft/<name>``, optionally
    followed by a file inside the folder), written once per session; read-only, like the real files."""
    top = "/".join(rel.split("/")[:2])
    if top not in _GENERATED:
        entries = _manifest()
        if top not in entries:
            raise KeyError(f"{top!r} is not in {FIXTURE_MANIFEST.name}")
        entry = entries[top]
        if root is None:
            root = _TMP_FACTORY[0].mktemp("fixtures") if _TMP_FACTORY else Path(tempfile.mkdtemp())
        dest = root / top
        dest.parent.mkdir(parents=True, exist_ok=True)
        if "adapter_config" in entry:
            dest.mkdir()
            (dest / "adapter_config.json").write_text(json.dumps(entry["adapter_config"], indent=2) + "\n")
            files = [dest / name for name in entry["files"]]
        else:
            files = [dest]
        for f in files:
            _write_lookalike_safetensors(f, entry["files"][f.name], top)
        for f in (*files, *([dest / "adapter_config.json"] if dest.is_dir() else [])):
            f.chmod(0o444)
        _GENERATED[top] = dest
    p = _GENERATED[top].joinpath(*rel.split("/")[2:])
    if not p.exists():
        raise FileNotFoundError(p)
    return p


def cli_result(argv, capsys):
    """Run ``lora-merge ARGV`` in-process (warnings shown as the CLI shows them); ``(exit code, stdout,
    stderr)``."""
    from lora_merge.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def save_tensors(path, sd):
    """``safetensors.torch.save_file(sd, path)``; returns ``path``."""
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path


def shared_fixture(rel: str) -> Path:
    """Path of real-world fixture ``rel`` (e.g. ``sd15/pokemon_style.safetensors``, ``peft/gpt2_tigrinya``):
    the real file when present, else its generated look-alike (see the module docstring)."""
    if fixtures_source() == "generated":
        return generated_fixture(rel)
    p = SHARED_FIXTURES / rel
    if not p.exists():
        pytest.fail(f"{FIXTURES_ENV}=real but the real-world fixture {rel} is not there")
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
