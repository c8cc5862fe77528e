"""SIGINT and SIGTERM at any moment of a real ``lora-merge merge`` process: one line ``interrupted``, exit
code 130, no output, no temporary file, inputs unchanged.

The moments are made exact by a small runner that sends the signal to its own process from inside the
merge (the handler runs at the next bytecode, as for a signal from outside): while the command module
is imported (start-up), after the second layer of the loop (worker threads busy), halfway through the
adapter's bytes, and while the report is written (the adapter already complete in its temporary file).
One more test sends the signals from outside during start-up."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lora_merge as lm
from lora_merge import Adapter, LoraModule

REPO = Path(__file__).resolve().parents[1]

RUNNER = textwrap.dedent('''
    import os, signal, sys
    stage, sig, argv = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3:]

    def kill():
        os.kill(os.getpid(), sig)

    if stage == "startup":  # just before the merge command's module (and torch) is imported
        import lora_merge.cli as c
        orig_get = c.LazyGroup.get_command
        def get_command(self, ctx, name):
            kill()
            return orig_get(self, ctx, name)
        c.LazyGroup.get_command = get_command
    elif stage == "loop":
        import lora_merge.engine.layers as L
        orig_store = L._Loop.store
        def store(self, *a):
            orig_store(self, *a)
            if self.done == 2:
                kill()
        L._Loop.store = store
    elif stage == "write":
        import lora_merge.formats.safetensors_io as io
        orig_ser = io._serialize
        class Half:
            def __init__(self, fh):
                self.fh, self.n = fh, 0
            def write(self, b):
                self.n += 1
                if self.n == 3:
                    kill()
                return self.fh.write(b)
        io._serialize = lambda tensors, md, fh: orig_ser(tensors, md, Half(fh))
    elif stage == "report":
        import lora_merge.engine.output as out
        orig_json = out.atomic_write_json
        def write_json(path, data, **kw):
            kill()
            return orig_json(path, data, **kw)
        out.atomic_write_json = write_json
    from lora_merge.cli import main
    main(argv)
''')


def _pair(tmp: Path, n_layers: int = 8) -> list[Path]:
    g = torch.Generator().manual_seed(3)
    paths = []
    for i in range(2):
        ad = Adapter(dialect="kohya")
        for j in range(n_layers):
            name = f"unet.up_blocks.1.attentions.{j % 3}.transformer_blocks.{j}.attn1.to_q"
            ad.modules[name] = LoraModule.from_tensors(name, torch.randn(8, 160, generator=g),
                                                       torch.randn(192, 8, generator=g), alpha=4.0)
        paths.append(lm.save(ad, tmp / f"in{i}.safetensors"))
    return paths


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _check_clean(tmp: Path, inputs: list[Path], before: dict[str, str], proc) -> None:
    assert proc.returncode == 130, proc.stderr
    # the last line says it; before it only the merge's own warnings (e.g. what --rank lost)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "interrupted" and all(x.startswith("warning: ") for x in lines[:-1]), proc.stderr
    assert sorted(p.name for p in tmp.iterdir()) == sorted(["runner.py", *before]), list(tmp.iterdir())
    assert _digest(inputs) == before


@pytest.mark.parametrize("stage", ["startup", "loop", "write", "report"])
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_leaves_nothing(tmp_path, stage, sig):
    inputs = _pair(tmp_path)
    before = _digest(inputs)
    (tmp_path / "runner.py").write_text(RUNNER)
    argv = ["merge", *map(str, inputs), "-o", str(tmp_path / "out.safetensors"), "--rank", "4",
            "--threads", "2", "--report", str(tmp_path / "report.json")]
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), stage, sig, *argv], cwd=tmp_path, check=False,
                          capture_output=True, text=True, timeout=120, env=_env())
    _check_clean(tmp_path, inputs, before, proc)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_from_outside_during_startup(tmp_path, sig):
    inputs = _pair(tmp_path, 3)
    before = _digest(inputs)
    (tmp_path / "runner.py").write_text(RUNNER)  # (not used: kept so the folder listing matches)
    code = "import sys; from lora_merge.cli import main; sys.argv[0] = 'lora-merge'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "merge", *map(str, inputs), "-o",
                             str(tmp_path / "out.safetensors")], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    time.sleep(0.25)  # the handlers are installed within ~50 ms; torch's import takes ~1 s
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    proc.stderr_text = err
    _check_clean(tmp_path, inputs, before, subprocess.CompletedProcess(proc.args, proc.returncode, out, err))


def test_a_signal_that_breaks_an_import_still_exits_130(monkeypatch, capsys):
    """A signal raised inside a C extension's import (numpy, under torch) can surface as an ImportError on
    the retry ("cannot load module more than once per process"): once the handler has run, any error from
    the start-up imports is the interrupt."""
    import lora_merge.cli as cli_mod

    monkeypatch.setitem(sys.modules, "lora_merge.files", None)  # the import now raises ImportError
    monkeypatch.setitem(cli_mod._STATE, "signalled", True)
    with pytest.raises(SystemExit) as exc:
        cli_mod._main(["inspect", "x.safetensors"])
    assert exc.value.code == 130 and "interrupted" in capsys.readouterr().err
    monkeypatch.setitem(cli_mod._STATE, "signalled", False)  # without a signal the error is the error
    with pytest.raises(ImportError):
        cli_mod._main(["inspect", "x.safetensors"])


def test_a_signal_after_the_commit_leaves_exit_0_and_the_output(tmp_path, monkeypatch, capsys):
    """SIGINT delivered right after the outputs are renamed into place: too late to undo, exit 0."""
    import signal as _signal

    from lora_merge import files
    from lora_merge.cli import main
    from lora_merge.toyworld import bundled_loras

    commit = files._Transaction.commit

    def commit_then_signal(self):
        commit(self)
        _signal.raise_signal(_signal.SIGINT)

    monkeypatch.setattr(files._Transaction, "commit", commit_then_signal)
    out = tmp_path / "peft"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(bundled_loras()["content"]), str(out), "--to", "peft"])
    assert exc.value.code == 0, capsys.readouterr().err
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()


def test_the_console_script_ignores_signals_once_it_is_done(tmp_path):
    """After a finished command the process ignores SIGINT/SIGTERM through the interpreter's shutdown
    (which resets Python handlers to the default: a Ctrl-C there once made a finished convert exit -2)."""
    import subprocess
    import sys

    from lora_merge.toyworld import bundled_loras

    code = ("import atexit, os, signal, sys\n"
            "from lora_merge.cli import main\n"
            "def late():\n"
            "    print('handlers', signal.getsignal(signal.SIGINT) == signal.SIG_IGN,\n"
            "          signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, file=sys.stderr)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "atexit.register(late)\n"
            "sys.argv[0] = 'lora-merge'\n"
            "main()\n")  # fmt: skip
    out = tmp_path / "peft"
    proc = subprocess.run([sys.executable, "-c", code, "convert", str(bundled_loras()["content"]), str(out),
                           "--to", "peft"], capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "handlers True True" in proc.stderr
    assert (out / "adapter_model.safetensors").is_file()
