"""One convention across the commands (issue 25): every registered command and sub-command is walked with
click's introspection and checked for ``-o/--output`` outputs, ``click.Choice`` closed sets and shown
defaults; then the behaviour behind them: ``--to`` lists only writable dialects, one ``--dtype`` rule for
``merge`` and ``convert``, a short ``merge --help``, ``merge --repair``, a short human summary of a ziplora
merge, ``diff --top`` on every list and the ``inspect`` layout line."""

from __future__ import annotations

import json
import re
import warnings

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import lora_merge as lm
from lora_merge import Adapter, LoraModule
from lora_merge.cli import cli, main
from lora_merge.cli.common import DTYPE_CHOICES, OPEN_SETS, SECONDARY_OUTPUTS


def _walk(cmd: click.Command, path: tuple[str, ...]):
    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=path[-1])
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} lists {name!r} but has no such command"
            yield from _walk(sub, (*path, name))


COMMANDS = {" ".join(path): cmd for path, cmd in _walk(cli, ("lora-merge",))}
OPTIONS = [(name, p) for name, cmd in COMMANDS.items() for p in cmd.params if isinstance(p, click.Option)]
IDS = [f"{name} {p.opts[-1]}" for name, p in OPTIONS]

#: option spellings that name what a command writes
OUTPUT_NAMES = {"--out", "--output", "--save", "--dest", "--destination", "--output-dir", "--out-dir", "--outdir",
                "--write"}
#: options known to take a closed set of values (plus every option whose help says "one of")
CLOSED_SETS = {"--to", "--dtype", "--format", "--granularity", "--mode", "--mixed-precision", "--input-model",
               "--axis", "--strength", "--divide", "--sign", "--variant", "--split", "--preset"}


def _long(p: click.Option) -> set[str]:
    return {o for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


def _is_output(p: click.Option) -> bool:
    if _long(p) & OUTPUT_NAMES:
        return True
    return isinstance(p.type, click.Path) and bool(re.search(r"\b(write|writes|written|append)\b", p.help or "", re.IGNORECASE))


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_the_walk_sees_every_command_and_sub_command():
    assert {"lora-merge merge", "lora-merge convert", "lora-merge priors measure", "lora-merge bench quality",
            "lora-merge toyworld train-base"} <= set(COMMANDS)


# ---------------------------------------------------------------- the option conventions
@pytest.mark.parametrize(("command", "opt"), OPTIONS, ids=IDS)
def test_an_output_is_dash_o_output(command, opt):
    if opt.hidden or not _is_output(opt) or _long(opt) & SECONDARY_OUTPUTS:
        return
    assert {"-o", "--output"} <= set(opt.opts), (
        f"{command}: the output option {'/'.join(opt.opts)} is not spelled -o/--output (a second output's own "
        "name goes into lora_merge.cli.common.SECONDARY_OUTPUTS)")


@pytest.mark.parametrize("command", ["merge", "convert", "calibrate", "priors", "priors measure", "bench quality",
                                     "toyworld train-base", "toyworld train-loras", "toyworld train-judge", "demo"])
def test_every_command_that_writes_takes_dash_o(command):
    opts = [p for p in COMMANDS[f"lora-merge {command}"].params if isinstance(p, click.Option) and "-o" in p.opts]
    assert len(opts) == 1 and "--output" in opts[0].opts


@pytest.mark.parametrize(("command", "opt"), OPTIONS, ids=IDS)
def test_a_closed_set_is_a_choice(command, opt):
    closed = bool(_long(opt) & CLOSED_SETS) or "one of" in (opt.help or "").lower()
    if _long(opt) & OPEN_SETS:
        assert not closed, f"{command} {opt.opts[-1]} is listed as an open set but its help says 'one of'"
        return
    if closed and not opt.is_flag:
        assert isinstance(opt.type, click.Choice), f"{command} {'/'.join(opt.opts)}: a closed set given as free text"


def test_strategy_options_with_choices_are_choices():
    from lora_merge.cli.merge_cmd import _strategy_params

    merge = COMMANDS["lora-merge merge"]
    by_dest = {p.name: p for p in merge.params}
    for name, owners in _strategy_params().items():
        if all(q.choices for _, q in owners) and name in by_dest and by_dest[name].hidden:
            assert isinstance(by_dest[name].type, click.Choice), name
            assert set(by_dest[name].type.choices) == {c for _, q in owners for c in q.choices}


def _unset(default) -> bool:
    return default is None or type(default).__name__ == "Sentinel" or default == () or default is False


@pytest.mark.parametrize(("command", "opt"), OPTIONS, ids=IDS)
def test_a_default_is_shown(command, opt):
    if opt.hidden or opt.is_flag or _unset(opt.default):
        return
    assert opt.show_default or "default" in (opt.help or "").lower(), (
        f"{command} {'/'.join(opt.opts)}: default {opt.default!r} not shown in its help")


def test_weights_states_its_default_and_base_names_say_model_or_file():
    merge = {p.name: p for p in COMMANDS["lora-merge merge"].params}
    assert "default: 1" in merge["weights"].help
    for command in ("merge", "convert"):
        bw = next(p for p in COMMANDS[f"lora-merge {command}"].params if p.name == "base_weights")
        assert bw.metavar == "FILE" and "file" in bw.help and "not a" in bw.help and "folder" in bw.help
    for command in ("calibrate", "priors measure"):
        base = next(p for p in COMMANDS[f"lora-merge {command}"].params if p.name == "base")
        assert base.metavar == "MODEL_DIR" and "folder" in base.help and "not a weights file" in base.help


# ---------------------------------------------------------------- --to and --dtype
def _adapter(seed=0, dtype=torch.float32, names=("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                                 "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"),
             r=4, dtypes=None):
    g = torch.Generator().manual_seed(seed)
    ad = Adapter(dialect="kohya")
    for i, n in enumerate(names):
        dt = dtypes[i] if dtypes else dtype
        ad.modules[n] = LoraModule.from_tensors(n, torch.randn(r, 32, generator=g).to(dt),
                                                (torch.randn(32, r, generator=g) * 0.1).to(dt), alpha=float(r))
    return ad


def _save(ad, path):
    return lm.save(ad, path, to="kohya")


def test_to_lists_only_the_writable_dialects(tmp_path, capsys):
    from lora_merge.formats import registered

    writable = [d.name for d in registered() if getattr(d, "writable", True)]
    assert "lycoris" not in writable and "xlabs" not in writable
    for command in ("merge", "convert"):
        to = next(p for p in COMMANDS[f"lora-merge {command}"].params if p.name == "to")
        assert list(to.type.choices) == writable
        fmt = next((p for p in COMMANDS[f"lora-merge {command}"].params if p.name == "fmt"), None)
        if fmt is not None:  # reading: every dialect
            assert "lycoris" in fmt.type.choices
    src = _save(_adapter(), tmp_path / "a.safetensors")
    for to in ("lycoris", "xlabs"):
        code, _, err = run(["convert", src, "-o", tmp_path / "x.safetensors", "--to", to], capsys)
        assert code == 2 and "is not one of" in err
        code, _, err = run(["merge", src, "-o", tmp_path / "x.safetensors", "--to", to], capsys)
        assert code == 2 and "is not one of" in err
    code, _, err = run(["merge", src, "--dry-run", "--dtype", "fp8"], capsys)
    assert code == 2 and "is not one of" in err
    assert list(next(p for p in COMMANDS["lora-merge merge"].params if p.name == "dtype").type.choices) == list(
        DTYPE_CHOICES)


def _stored(path) -> set[torch.dtype]:
    return {t.dtype for m in lm.load(path) for t in (m.down, m.up)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_one_dtype_rule_in_merge_and_convert_inputs_that_agree(tmp_path, capsys, dtype):
    a = _save(_adapter(0, dtype), tmp_path / "a.safetensors")
    b = _save(_adapter(1, dtype), tmp_path / "b.safetensors")
    code, out, err = run(["merge", a, b, "-o", tmp_path / "m.safetensors", "--json"], capsys)
    assert code == 0, err
    assert _stored(tmp_path / "m.safetensors") == {dtype}
    assert json.loads(out)["dtype"] == str(dtype).removeprefix("torch.")
    code, _, err = run(["convert", a, "-o", tmp_path / "c.safetensors", "--to", "diffusers"], capsys)
    assert code == 0, err
    assert _stored(tmp_path / "c.safetensors") == {dtype}


def test_one_dtype_rule_mixed_inputs_give_fp32_and_dtype_overrides(tmp_path, capsys):
    a = _save(_adapter(0, torch.float16), tmp_path / "a.safetensors")
    b = _save(_adapter(1, torch.bfloat16), tmp_path / "b.safetensors")
    code, _, err = run(["merge", a, b, "-o", tmp_path / "m.safetensors"], capsys)
    assert code == 0, err
    assert _stored(tmp_path / "m.safetensors") == {torch.float32}
    mixed = _save(_adapter(2, dtypes=(torch.float16, torch.bfloat16)), tmp_path / "mixed.safetensors")
    code, _, err = run(["convert", mixed, "-o", tmp_path / "c.safetensors", "--to", "diffusers"], capsys)
    assert code == 0, err
    assert _stored(tmp_path / "c.safetensors") == {torch.float32}
    code, out, err = run(["diff", mixed, tmp_path / "c.safetensors", "--json"], capsys)
    assert json.loads(out)["max_rel_diff"] == 0.0  # fp32 holds fp16 and bf16 exactly
    code, _, err = run(["merge", a, b, "-o", tmp_path / "h.safetensors", "--dtype", "fp16"], capsys)
    assert code == 0, err
    assert _stored(tmp_path / "h.safetensors") == {torch.float16}


def test_the_recorded_dtype_replays_the_merge_byte_for_byte(tmp_path, capsys):
    from lora_merge.engine import Recipe, run_merge

    a = _save(_adapter(0, torch.float16), tmp_path / "a.safetensors")
    b = _save(_adapter(1, torch.float16), tmp_path / "b.safetensors")
    out = tmp_path / "m.safetensors"
    assert run(["merge", a, b, "-o", out, "--weights", "0.5,0.7"], capsys)[0] == 0
    recipe = Recipe.from_metadata(out)
    assert recipe.dtype == "float16"
    again = run_merge(recipe.with_overrides(inputs=(a, b), output=str(tmp_path / "again.safetensors"))).output
    assert again.read_bytes() == out.read_bytes()


# ---------------------------------------------------------------- merge --help and --repair
def test_merge_help_is_short_and_points_to_strategies_name(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = CliRunner().invoke(cli, ["merge", "--help"], terminal_width=80).output
    assert len(out.splitlines()) < 60, out
    assert "lora-merge strategies NAME" in " ".join(out.split())
    for opt in ("--density", "--lambda-sim", "--energy", "--preset"):  # `strategies NAME` lists them
        assert not re.search(rf"^\s+{opt}\b", out, re.MULTILINE), opt
    for opt in ("-o, --output", "--strategy", "--weights", "--to", "--dtype", "--repair", "--dry-run"):
        assert opt in out
    from lora_merge.strategies import available_strategies

    flat = " ".join(out.split())
    assert all(name in flat for name in available_strategies())


def test_hidden_strategy_options_still_work(tmp_path, capsys):
    a = _save(_adapter(0), tmp_path / "a.safetensors")
    b = _save(_adapter(1), tmp_path / "b.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ties: the dense result re-factored
        code, out, err = run(["merge", a, b, "-s", "ties", "--density", "0.5", "--divide", "weights", "--dry-run",
                              "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["params"]["density"] == 0.5 and json.loads(out)["params"]["divide"] == "weights"
    code, _, err = run(["merge", a, b, "-s", "ties", "--divide", "sideways", "--dry-run"], capsys)
    assert code == 2 and "is not one of" in err


def _broken(path, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in ("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "up_blocks_1_attentions_0_proj_in"):
        sd[f"lora_unet_unet_{n}_lora_down.weight"] = torch.randn(4, 64, generator=g)
        sd[f"lora_unet_unet_{n}_lora_up.weight"] = torch.randn(64, 4, generator=g)
    save_file(sd, str(path))
    return path


def test_merge_repair_reads_broken_layouts_like_convert_repair(tmp_path, capsys):
    a, b = _broken(tmp_path / "a.safetensors", 0), _broken(tmp_path / "b.safetensors", 1)
    code, _, err = run(["merge", a, b, "-o", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and "--repair" in err
    code, _, err = run(["merge", a, b, "-o", tmp_path / "m.safetensors", "--repair", "--weights", "0.5,0.25"], capsys)
    assert code == 0, err
    for src in (a, b):
        assert run(["convert", src, "-o", tmp_path / f"fixed_{src.name}", "--repair"], capsys)[0] == 0
    fa, fb = lm.load(tmp_path / "fixed_a.safetensors"), lm.load(tmp_path / "fixed_b.safetensors")
    merged = lm.load(tmp_path / "m.safetensors")
    assert set(merged.modules) == set(fa.modules)
    for name, m in merged.modules.items():
        torch.testing.assert_close(m.delta(), 0.5 * fa[name].delta() + 0.25 * fb[name].delta(), rtol=1e-5, atol=1e-6)


def test_convert_takes_dash_o_or_the_second_argument(tmp_path, capsys):
    src = _save(_adapter(), tmp_path / "a.safetensors")
    assert run(["convert", src, tmp_path / "p.safetensors", "--to", "diffusers"], capsys)[0] == 0
    assert run(["convert", src, "-o", tmp_path / "o.safetensors", "--to", "diffusers"], capsys)[0] == 0
    assert (tmp_path / "p.safetensors").read_bytes() == (tmp_path / "o.safetensors").read_bytes()
    code, _, err = run(["convert", src, tmp_path / "x.safetensors", "-o", tmp_path / "y.safetensors"], capsys)
    assert code == 2 and "two outputs" in err
    code, _, err = run(["convert", src, "--to", "diffusers"], capsys)
    assert code == 2 and "-o/--output" in err


# ---------------------------------------------------------------- short human output
BLOCKS = ("down_blocks.1.attentions.0", "down_blocks.2.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.1")


def _mask_pair(tmp_path, layers=8):
    g = torch.Generator().manual_seed(0)
    c, s = Adapter(dialect="diffusers"), Adapter(dialect="diffusers")
    for i in range(layers):
        name = f"unet.{BLOCKS[i % len(BLOCKS)]}.transformer_blocks.{i}.attn1.to_q"
        for ad in (c, s):
            ad.modules[name] = LoraModule.from_tensors(name, torch.randn(4, 32, generator=g),
                                                       torch.randn(24, 4, generator=g) * 0.1, alpha=4.0)
    return lm.save(c, tmp_path / "c.safetensors", to="diffusers"), lm.save(s, tmp_path / "s.safetensors", to="diffusers")


@pytest.mark.parametrize("strategy", ["ziplora", "duolora"])
def test_mask_strategy_human_summary_is_short_and_json_has_everything(tmp_path, capsys, strategy):
    c, s = _mask_pair(tmp_path)
    args = ["merge", c, s, "-s", strategy, "--arch", "sdxl", "--steps", "3", "--dry-run"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, err = run(args, capsys)
        assert code == 0, err
        code, js, err = run([*args, "--json"], capsys)
    assert code == 0, err
    rep = json.loads(js)["strategy_report"]
    assert rep["blocks"] and rep["loss_mean"]["init"] and rep["loss_mean"]["final"]  # --json: everything
    assert "strategy_report" not in out and '{"' not in out and "recon_content" not in out
    assert len(out) < 3000 and len(out.splitlines()) < 30, out
    masks = next(line for line in out.splitlines() if line.strip().startswith("masks "))
    assert f"{rep['layers']} layers" in masks
    assert "content" in out and "style" in out and "mean masks" in out
    assert "→" in next(line for line in out.splitlines() if line.strip().startswith("loss"))


def _ranked(tmp_path, name, ranks, extra=()):
    g = torch.Generator().manual_seed(len(name))
    ad = Adapter(dialect="kohya")
    for i, r in enumerate(ranks):
        n = f"unet.down_blocks.0.attentions.0.transformer_blocks.{i}.attn1.to_q"
        ad.modules[n] = LoraModule.from_tensors(n, torch.randn(r, 32, generator=g),
                                                torch.randn(32, r, generator=g) * 0.1, alpha=float(r))
    for i in extra:
        n = f"unet.up_blocks.1.attentions.0.transformer_blocks.{i}.attn1.to_k"
        ad.modules[n] = LoraModule.from_tensors(n, torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g))
    return lm.save(ad, tmp_path / f"{name}.safetensors", to="kohya")


def test_diff_top_limits_every_list(tmp_path, capsys):
    a = _ranked(tmp_path, "a", [2] * 6, extra=range(5))
    b = _ranked(tmp_path, "b", [4] * 6)
    code, out, err = run(["diff", a, b, "--top", "2"], capsys)
    assert code == 0, err
    section = out.split("rank / alpha / shape changes", 1)[1]
    listed = [ln for ln in section.split("… and", 1)[0].splitlines() if "transformer_blocks" in ln]
    assert len(listed) == 2
    assert "… and 4 more rank/alpha/shape changes" in out
    assert "… and 3 more only in A" in out
    assert "… and 4 more common modules" in out
    code, out, err = run(["diff", a, b, "--top", "10"], capsys)
    assert code == 0 and "… and" not in out
    code, js, _ = run(["diff", a, b, "--top", "2", "--json"], capsys)
    r = json.loads(js)
    assert len(r["changes"]) == 6 and len(r["only_in_a"]) == 5  # --json keeps every row


# ---------------------------------------------------------------- the inspect layout line
def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z0-9_-]+", text.lower()) if w not in ("and", "the", "in", "of")]


def test_layout_lines_repeat_no_word():
    from lora_merge import families
    from lora_merge.cli.inspect_cmd import layout_line

    for fam in families.builtin_families():
        for layout, note in (fam.layout_notes or {}).items():
            words = _words(layout_line(layout, note))
            assert len(words) == len(set(words)), f"{fam.name}: {layout_line(layout, note)!r}"
    assert layout_line("native", "native") == "native" and layout_line("native", None) == "native"


def test_inspect_flux_layout_line(tmp_path, capsys):
    h, g, sd = 16, torch.Generator().manual_seed(0), {}
    for name, (o, i) in {"lora_unet_double_blocks_0_img_attn_qkv": (3 * h, h),
                         "lora_unet_double_blocks_0_txt_attn_qkv": (3 * h, h),
                         "lora_unet_single_blocks_0_linear1": (7 * h, h),
                         "lora_unet_single_blocks_0_linear2": (h, 5 * h)}.items():
        sd[f"{name}.lora_down.weight"] = torch.randn(2, i, generator=g)
        sd[f"{name}.lora_up.weight"] = torch.randn(o, 2, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(tmp_path / "flux.safetensors"))
    code, out, err = run(["inspect", tmp_path / "flux.safetensors"], capsys)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if re.search(r"│ layout\b", ln))
    assert "native: BFL" in line and "native: native" not in line and "native (BFL)" not in line


def test_dtype_takes_the_recipe_spellings_too(tmp_path, capsys):
    from lora_merge.cli.common import DTYPE_ALIASES
    from lora_merge.files import DTYPES

    assert set(DTYPES) == set(DTYPE_ALIASES) | set(DTYPE_CHOICES)
    assert all(DTYPES[k] == DTYPES[v] for k, v in DTYPE_ALIASES.items())
    a = _save(_adapter(0), tmp_path / "a.safetensors")
    for spelling, want in (("float16", torch.float16), ("BF16", torch.bfloat16), ("half", torch.float16)):
        out = tmp_path / f"{spelling}.safetensors"
        code, _, err = run(["convert", a, "-o", out, "--to", "diffusers", "--dtype", spelling], capsys)
        assert code == 0, err
        assert _stored(out) == {want}
