"""The Python API's errors: every public exception and warning class is importable from ``lora_merge``, and
an error raised through the API names Python keywords (``force=True``), not the command line's options —
which the CLI keeps."""

from __future__ import annotations

import inspect

import pytest

import lora_merge
from lora_merge import errors
from lora_merge.toyworld import bundled_loras


def test_every_public_exception_and_warning_is_exported():
    classes = {n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, (BaseException, Warning))
               and c.__module__ == errors.__name__}  # fmt: skip
    classes |= {"DenseRefactorWarning", "LoaderWarning"}
    assert classes <= set(lora_merge.__all__)
    for name in classes:
        assert issubclass(getattr(lora_merge, name), (BaseException, Warning)), name


def test_api_errors_use_python_keywords(tmp_path):
    src = bundled_loras()["content"]
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    with pytest.raises(lora_merge.OutputExistsError, match=r"exists; pass force=True to overwrite it$"):
        lora_merge.merge([src, src], out)
    with pytest.raises(lora_merge.OutputExistsError, match=r"even with force=True"):
        lora_merge.merge([src, src], src, force=True)
    with pytest.raises(lora_merge.UsageError, match="full_rank=True"):
        lora_merge.merge([src, src], strategy="ties", rank=2, full_rank=True)
    assert out.read_bytes() == b"x"


@pytest.mark.parametrize("message, want", [
    ("exists; pass --force to overwrite it", "exists; pass force=True to overwrite it"),
    ("--rank K to choose the rank", "rank=K to choose the rank"),
    ("--to peft: a folder; --to kohya for ComfyUI", "to='peft': a folder; to='kohya' for ComfyUI"),
    ("--mode model needs --base, --content-images", "mode='model' needs base=..., content_images=..."),
    ("--weights 0.5", "weights=0.5"),
    ("run `lora-merge convert IN OUT --repair` (--repair)", "run `lora-merge convert IN OUT --repair` (repair=True)"),
])  # fmt: skip
def test_python_words(message, want):
    assert errors.python_words(message) == want


def test_the_cli_keeps_its_own_words(tmp_path, capsys):
    from conftest import run_cli

    src = bundled_loras()["content"]
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"x")
    code, _, err = run_cli(["merge", src, src, "-o", out], capsys)
    assert code == 4 and "exists; pass --force to overwrite it" in err
