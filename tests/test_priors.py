"""Layer priors as data (lora_merge.priors) and ``lora-merge priors``."""
from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from lora_merge.errors import FormatError, OutputExistsError, UsageError
from lora_merge.priors import LayerPriors, PriorRule, load_priors, priors_from_resolutions, register_priors

Q = ".transformer_blocks.0.attn1.to_q"


def test_sdxl_table_follows_the_resolution_rule_and_covers_every_attention_block():
    p = load_priors("sdxl")
    for blk in ("down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.0.attentions.2"):
        assert p.role_of(f"unet.{blk}{Q}") == "content"  # latent 32 at 1024 px
    for blk in ("down_blocks.1.attentions.0", "up_blocks.1.attentions.2"):
        assert p.role_of(f"unet.{blk}{Q}") == "style"  # latent 64
    assert p.role_of("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == "neutral"
    assert p.role_of(f"down_blocks.2.attentions.0{Q}") == "content"  # the unet. prefix is optional
    assert p.rule_for(f"unet.mid_block.attentions.0{Q}").resolution == 32
    assert p.role_of(f"unet.up_blocks.10.attentions.0{Q}") == "neutral"  # no false prefix match


def test_sd1_table():
    p = load_priors("sd1")
    content = ["down_blocks.2", "mid_block", "up_blocks.1"]
    style = ["down_blocks.0", "down_blocks.1", "up_blocks.2", "up_blocks.3"]
    for blk in content:
        assert p.role_of(f"unet.{blk}.attentions.0{Q}") == "content"
    for blk in style:
        assert p.role_of(f"unet.{blk}.attentions.0{Q}") == "style"
    assert load_priors("auto", "sd1").to_dict() == p.to_dict()


def test_b_lora_preset():
    p = load_priors("b-lora")
    assert p.role_of(f"unet.up_blocks.0.attentions.0{Q}") == "content"
    assert p.role_of(f"unet.up_blocks.0.attentions.1{Q}") == "style"
    assert p.role_of(f"unet.up_blocks.0.attentions.2{Q}") == "neutral"
    assert p.role_of(f"unet.mid_block.attentions.0{Q}") == "neutral"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_roundtrip_first_match_wins_and_scores(tmp_path, suffix):
    p = LayerPriors([PriorRule("unet.up_blocks.0.attentions.1", "style", 0.5),
                     PriorRule("unet.up_blocks.0", "content", 2.0),
                     PriorRule("*.attn2.*", "neutral")], arch="sdxl", source="test")  # fmt: skip
    path = p.to_file(tmp_path / f"p{suffix}")
    q = load_priors(str(path))
    assert q.to_dict() == p.to_dict()
    assert q.role_of(f"unet.up_blocks.0.attentions.1{Q}") == "style" and q.score_of(f"unet.up_blocks.0.attentions.1{Q}") == 0.5
    assert q.role_of(f"unet.up_blocks.0.attentions.2{Q}") == "content" and q.score_of(f"unet.up_blocks.0.attentions.2{Q}") == 2.0
    assert q.role_of("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k") == "neutral"
    with pytest.raises(OutputExistsError):
        p.to_file(path)


def test_bad_priors_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FormatError, match="cannot parse"):
        load_priors(str(bad))
    bad.write_text(json.dumps({"rules": [{"pattern": "x", "role": "vibes"}]}))
    with pytest.raises(FormatError, match="rule 0"):
        load_priors(str(bad))
    bad.write_text(json.dumps({"format": "other/9", "rules": []}))
    with pytest.raises(FormatError, match="unknown priors format"):
        load_priors(str(bad))
    with pytest.raises(UsageError, match="architecture is unknown"):
        load_priors("auto", None)
    with pytest.raises(UsageError, match="no layer priors"):
        load_priors("flux")
    with pytest.raises(UsageError, match="not found"):
        load_priors(str(tmp_path / "missing.json"))


def test_register_a_table_from_resolutions():
    register_priors("tiny-test", lambda: priors_from_resolutions("tiny-test", {"down_blocks.0": 16, "mid_block": 4}, 16))
    p = load_priors("auto", "tiny-test")
    assert p.role_of("unet.mid_block.attentions.0.x") == "content"
    assert p.role_of("unet.down_blocks.0.attentions.0.x") == "style"


def test_cli_prints_tables_json_and_accepts_subcommands(tmp_path):
    from lora_merge.cli import cli
    from lora_merge.cli.priors_cmd import priors

    r = CliRunner().invoke(cli, ["priors", "sdxl", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["arch"] == "sdxl" and {x["pattern"]: x["role"] for x in data["rules"]}["unet.mid_block"] == "content"
    r = CliRunner().invoke(cli, ["priors", "b-lora"])
    assert r.exit_code == 0 and "up_blocks.0.attentions.1" in r.output
    r = CliRunner().invoke(cli, ["priors", "--json", "sd1", "--save", str(tmp_path / "sd1.json")])
    assert r.exit_code == 0 and load_priors(str(tmp_path / "sd1.json")).arch == "sd1"
    r = CliRunner().invoke(cli, ["priors", "--save", str(tmp_path / "b.yaml"), "b-lora"])  # option value first
    assert r.exit_code == 0 and load_priors(str(tmp_path / "b.yaml")).name.endswith("b.yaml")

    @priors.command("hello-test")
    @click.argument("x")
    def _hello(x):
        click.echo(f"sub {x}")

    try:
        r = CliRunner().invoke(cli, ["priors", "hello-test", "7"])
        assert r.exit_code == 0 and r.output.strip() == "sub 7"
    finally:
        priors.commands.pop("hello-test")


def test_cli_guesses_the_architecture_of_a_lora_file():
    from conftest import shared_fixture

    from lora_merge.cli import cli

    path = shared_fixture("sd15/pokemon_style.safetensors")
    r = CliRunner().invoke(cli, ["priors", str(path), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])
    assert data["arch"] == "sd1" and sum(data["layers_by_role"].values()) == 128
