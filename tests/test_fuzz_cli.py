"""Property test: hostile inputs through the command line. Header, byte, value and PEFT-config mutations of
the real-world fixtures (their generated look-alikes in a clone, see tests/conftest.py) and of small
synthetic adapters go through inspect, convert, merge, diff and priors in-process; every run ends in a
clean one-line error or a success — no traceback, no output or temporary file left after an error, inputs
unchanged, no NaN written. The campaign's other scenarios run on one small LoRA of each model family:
``--arch`` forced, hostile recipe files, values that overflow on a cast or a product, and special files
(FIFO, device node, socket, symlink, folder) where an output goes — which must still be there, unchanged
in kind. The mutations and the check are those of ``benchmarks/fuzz_campaign.py`` (the long campaign with
a fork server; see docs/reliability.md)."""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, shared_fixture
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

_spec = importlib.util.spec_from_file_location("fuzz_campaign", REPO / "benchmarks" / "fuzz_campaign.py")
fz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_campaign"] = fz  # (dataclasses look their module up there)
_spec.loader.exec_module(fz)

#: cheap enough for the suite (the campaign adds the slow ones: --modules, diff and ziplora on fixtures)
FAST = ["inspect", "inspect-json", "convert", "convert-peft", "merge", "merge-rank", "merge-ties", "merge-report",
        "diff", "priors"]
SETTINGS = settings(max_examples=70, deadline=None, derandomize=False, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return fz.synthetic(tmp_path_factory.mktemp("bases"))


def _check(base: fz.Base, command: str, seed: int, how: str) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        inp = folder / "in"
        inp.mkdir()
        if base.peft:
            bad, good = inp / "bad_adapter", inp / "good_adapter"
            shutil.copytree(base.path, bad)
            shutil.copytree(base.path, good)
            for p in (*bad.iterdir(), *good.iterdir()):
                p.chmod(0o644)
            what = fz.peft_mutation(rng, bad)
        else:
            bad, good = inp / "bad.safetensors", inp / "good.safetensors"
            shutil.copyfile(base.path, good)
            good.chmod(0o644)
            fn = {"header": fz.header_mutation, "values": fz.value_mutation, "bytes": fz.byte_mutation}[how]
            data, what = fn(rng, base.path.read_bytes(), light=True) if how == "header" else fn(rng, base.path.read_bytes())
            bad.write_bytes(data)
        out = folder / "out"
        out.mkdir()
        argv, output = fz.argv_for(command, bad, good, out)
        before = fz.digest([inp])
        code, _, err = fz.run_in_process(argv)
        nonfinite = code == 0 and fz.nonfinite_output(output)
        outcome = fz.classify(code, err, output, out, before, fz.digest([inp]), nonfinite)
        assert outcome in ("clean error", "success"), f"{outcome}: {command} on {base.name} ({what}): {err}"


@given(which=st.integers(0, 2), command=st.sampled_from(FAST), seed=st.integers(0, 2**32),
       how=st.sampled_from(["header", "values", "bytes"]))
@SETTINGS
def test_mutated_synthetic_inputs(bases, which, command, seed, how):
    _check(bases[which], command, seed, how)


@given(name=st.sampled_from([*fz.SD15, *fz.PEFT]), command=st.sampled_from(["inspect", "convert", "merge", "priors"]),
       seed=st.integers(0, 2**32), how=st.sampled_from(["header", "values", "bytes"]))
@settings(SETTINGS, max_examples=25)
def test_mutated_real_fixtures(name, command, seed, how):
    peft = name in fz.PEFT
    path = shared_fixture(f"peft/{name}" if peft else f"sd15/{name}.safetensors")
    _check(fz.Base(name, path, peft=peft, big=True), command, seed, how)


@pytest.fixture(scope="module")
def family_bases(tmp_path_factory):
    return fz.family_bases(tmp_path_factory.mktemp("families"))


def test_family_loras_are_detected_as_their_family(family_bases):
    import lora_merge
    from lora_merge import families
    from lora_merge.arch import guess_arch

    assert {b.family for b in family_bases} == set(families.BUILTIN)  # one LoRA for every built-in family
    for b in family_bases:
        ad = lora_merge.load(b.path)
        assert guess_arch(ad) == b.family and not ad.unparsed_keys, b.name


SCENARIO_COMMANDS = {s: [c for c in FAST if groups.get(fz.COMMANDS[c])] for s, groups in fz.SCENARIOS.items()}


def known_failure(command: str, mutation: str) -> str:
    """The failure classes the campaign found (docs/reliability.md, "The campaign") that are not fixed yet:
    such a case is skipped, so that the test still guards the rest.  Remove each line once fixed (none
    open: dry runs, YAML aliases and a recipe device of the wrong type are fixed and guarded here)."""
    return ""


@given(scenario=st.sampled_from(sorted(fz.SCENARIOS)), which=st.integers(0, len(fz.FAMILY_SPECS) - 1),
       command=st.integers(0, 100), seed=st.integers(0, 2**32))
@settings(SETTINGS, max_examples=40)
def test_campaign_scenarios_on_family_loras(family_bases, scenario, which, command, seed):
    cmd = SCENARIO_COMMANDS[scenario][command % len(SCENARIO_COMMANDS[scenario])]
    base = family_bases[which]
    with tempfile.TemporaryDirectory() as d:
        prep = fz.prepare(random.Random(seed), scenario, cmd, base, Path(d), family_bases, light=True)
        assume(not known_failure(cmd, prep.mutation))
        outcome, unmet, code, err, _ = fz.run_prepared(prep, Path(d))
    assert outcome in ("clean error", "success") and not unmet, \
        f"{outcome} {unmet}: {cmd} on {base.name} ({prep.mutation}): exit {code}: {err}"
