"""`lora-merge --version`, `--help` and `strategies` answer without importing torch,
from a generated catalogue that must match the live commands and strategies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lora_merge.cli import COMMANDS, cli
from lora_merge.cli.fast import live_catalogue, load_catalogue


def _fast(*args: str) -> tuple[str, bool]:
    """(stdout, whether torch got imported) of the console entry point in a fresh interpreter."""
    code = ("import sys; from lora_merge.cli import main\n"
            "try:\n    main()\nfinally:\n    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)")
    env = {**os.environ, "COLUMNS": "100"}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr.strip().endswith("TORCH") and not r.stderr.strip().endswith("NO-TORCH")


def test_catalogue_is_current():
    assert live_catalogue(COMMANDS) == load_catalogue(), (
        "stale: run python -c 'from lora_merge.cli import COMMANDS; from lora_merge.cli.fast import "
        "write_catalogue; write_catalogue(COMMANDS)'")


def test_version_and_help_match_click_and_skip_torch():
    out, torch_loaded = _fast("--version")
    assert out == CliRunner().invoke(cli, ["--version"]).output and not torch_loaded
    out, torch_loaded = _fast("--help")
    assert not torch_loaded and "Commands:" in out and "strategies" in out
    import click

    from lora_merge.cli.fast import _group_help

    assert _group_help(cli) == cli.get_help(click.Context(cli, info_name="lora-merge"))  # the same text as click


@pytest.mark.parametrize("args", [["strategies"], ["strategies", "--json"], ["strategies", "ties"],
                                  ["strategies", "dare", "--json"], ["strategies", "timestep-split"],
                                  ["strategies", "--sampling-time", "--json"], ["strategies", "k-lora", "--json"]])
def test_strategies_match_the_registry_and_skip_torch(args, monkeypatch):
    """The torch-free catalogue path prints what the registry does, sampling-time mergers included."""
    from lora_merge.cli.strategies_cmd import strategies

    out, torch_loaded = _fast(*args)
    assert not torch_loaded
    monkeypatch.setenv("COLUMNS", "100")
    slow = CliRunner().invoke(strategies, args[1:]).output
    if "--json" in args:
        assert json.loads(out) == json.loads(slow)
    else:
        assert out == slow


def test_unknown_strategy_takes_the_normal_path():
    code = ("from lora_merge.cli import cli; from lora_merge.cli.fast import answer; "
            "print(answer(['strategies', 'nope'], cli))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.stdout.strip() == "None"
