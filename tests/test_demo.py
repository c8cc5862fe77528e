"""``lora-merge demo`` end to end at a reduced N, its picture (drawn from the table the terminal prints),
its options, and ``bench quality``'s variant discovery."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("diffusers")

import torch
from click.testing import CliRunner

from lora_merge.bench import grid as grid_mod
from lora_merge.bench.variants import ABLATIONS, default_variants, demo_variants, known_strategies
from lora_merge.cli import cli, demo_cmd
from lora_merge.strategies import available_strategies
from lora_merge.toyworld import world
from lora_merge.toyworld.suite import pairs

PAIR = pairs(demo_cmd.DEMO_PAIR)[0]


def _capture_grids(monkeypatch) -> list:
    """The Grid objects the demo renders, in order (the real renderer runs)."""
    grids = []
    real = demo_cmd.render_demo

    def spy(*a, **kw):
        grids.append(real(*a, **kw))
        return grids[-1]

    monkeypatch.setattr(demo_cmd, "render_demo", spy)
    return grids


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_demo_writes_grid_and_judges(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    grids = _capture_grids(monkeypatch)
    # ZipLoRA/DuoLoRA optimise per layer (tens of seconds): the suite runs the closed-form rows only
    r = CliRunner().invoke(cli, ["demo", "--n", "2", "--json", "--strategies", "linear", "-o", "demo.png"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    png = tmp_path / "demo.png"
    assert png.is_file() and doc["grid"] == "demo.png"
    labels = [row["label"] for row in doc["rows"]]
    assert labels == ["content LoRA alone", "style LoRA alone", "linear (1, 1)", "linear (0.5, 0.5)"]
    for row in doc["rows"]:
        assert row["n"] == 2
        assert row["content_acc"] is not None and 0 <= row["content_acc"] <= 1
    # the style row says what the style is and which one shape it was learned from (what its images show)
    style_row = doc["rows"][1]
    assert world.STYLE_CONCEPTS[PAIR.style] in style_row["detail"] and PAIR.style in style_row["detail"]
    # the picture drew the table the JSON reports: each row's label and every cell, the best row framed
    (g,) = grids
    assert doc["columns"] == list(demo_cmd.SCORE_COLUMNS)
    for i, row in enumerate(doc["table"]):
        assert g.text("label", row=i) == row["label"]
        drawn = g.text("cell", row=i)
        for cell in row["cells"]:
            assert _flat(cell) in drawn
    assert [doc["table"][i]["label"] for i in g.best_rows] == [doc["best"]]
    assert all(t.fits for t in g.texts)
    with Image.open(png) as im:
        assert im.size == g.image.size and im.size[1] >= len(labels) * 16 * 4
    # never overwrite without --force
    r2 = CliRunner().invoke(cli, ["demo", "--n", "1", "--strategies", "linear", "--output", "demo.png"])
    assert r2.exit_code != 0 and "exists" in str(r2.exception or r2.output)


def test_demo_terminal_table_and_picture_share_rows_and_out_still_works(tmp_path, monkeypatch):
    """The deprecated ``--out`` still writes the picture; the terminal prints the rows the picture draws."""
    grids = _capture_grids(monkeypatch)
    out = tmp_path / "old.png"
    r = CliRunner().invoke(cli, ["demo", "--n", "1", "--strategies", "linear", "--out", str(out)],
                           terminal_width=200)
    assert r.exit_code == 0, r.output
    assert out.is_file() and "--out is deprecated" in r.stderr
    (g,) = grids
    for i in range(len(g.row_boxes)):
        assert g.text("label", row=i) in r.stdout
        for line in g.lines("cell", row=i):
            assert line in r.stdout
    assert ("best" in r.stdout) == bool(g.best_rows)


def test_demo_output_option_names(tmp_path):
    existing = tmp_path / "x.png"
    existing.write_bytes(b"")
    for flag in ("-o", "--output", "--out"):
        r = CliRunner().invoke(cli, ["demo", "--n", "1", "--strategies", "linear", flag, str(existing)])
        assert r.exit_code != 0 and "exists" in str(r.exception or r.output), flag
    r = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")])
    assert r.exit_code != 0 and "different" in str(r.exception or r.output)
    r = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path / "a.txt")])
    assert r.exit_code != 0 and "-o/--output" in str(r.exception or r.output)
    helptext = CliRunner().invoke(cli, ["demo", "--help"]).output
    assert "-o, --output" in helptext and "--out " not in helptext


def test_demo_help_names_exactly_the_strategies_it_runs():
    r = CliRunner().invoke(cli, ["demo", "--help"], terminal_width=1000, max_content_width=1000)
    assert r.exit_code == 0, r.output
    m = re.search(r"Default \((\d+) rows\): (.*?)\.(?:\s|$)", _flat(r.output))
    assert m, r.output
    listed = m.group(2).split("; ")
    runs = [v.label for v in demo_variants(None)]
    assert listed == runs and int(m.group(1)) == len(runs)
    named = {s for s in known_strategies() if re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", m.group(2))}
    assert named == {v.strategy for v in demo_variants(None)}


def _table(best_index: int = 3):
    def imgs(shape, style):
        return world.render_batch([shape] * 4, [style] * 4, range(4))

    rows = [
        {"label": "content LoRA alone", "detail": demo_cmd.describe_concept(PAIR.subject),
         "prompt": PAIR.content_prompt, "content_acc": 1.0, "style_acc": None, "joint_acc": 1.0,
         "shapes_seen": {PAIR.subject: 4}, "styles_seen": {"stripes": 4}, "images": imgs(PAIR.subject, "stripes")},
        {"label": "style LoRA alone", "detail": demo_cmd.describe_concept(PAIR.style),
         "prompt": "a circle in mrv style", "content_acc": 0.25, "style_acc": 1.0, "joint_acc": 0.25,
         "shapes_seen": {"square": 3, "circle": 1}, "styles_seen": {"mrv": 4}, "images": imgs("square", "mrv")},
    ]
    for k, (label, acc) in enumerate((("linear (1, 1)", 0.5), ("timestep-split", 1.0), ("k-lora", 0.0))):
        rows.append({"label": label, "strategy": label.split()[0], "prompt": PAIR.joint_prompt,
                     "detail": None, "content_acc": acc, "style_acc": 1.0, "joint_acc": acc,
                     "merge_seconds": 0.07 if k == 0 else None, "shapes_seen": {"ohwx": 2, "square": 2},
                     "styles_seen": {"mrv": 4}, "images": imgs("ohwx", "mrv")})
    best = rows[best_index]
    return demo_cmd.demo_table(rows, best), [r["images"] for r in rows]


def test_demo_picture_has_title_prompt_scores_and_best_row(monkeypatch):
    from PIL import ImageDraw

    drawn = []
    real_text = ImageDraw.ImageDraw.text

    def spy(self, xy, text, *a, **kw):
        drawn.append(text)
        return real_text(self, xy, text, *a, **kw)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    table, images = _table()
    g = demo_cmd.render_demo(PAIR, 4, table, images)
    assert drawn == g.lines()  # the grid records exactly what it drew
    assert "lora-merge demo" in g.text("title") and PAIR.subject in g.text("title")
    assert f'"{PAIR.joint_prompt}"' in g.text("subtitle")
    for col in demo_cmd.SCORE_COLUMNS:
        assert col in g.lines("header")
    for i, row in enumerate(table):
        assert g.text("label", row=i) == row.label
        assert f'prompt: "{row.prompt}"' in g.text("note", row=i)
        cells = g.text("cell", row=i)
        for cell in row.cells:
            assert _flat(cell) in cells
    assert "100%" in g.text("cell", row=3) and "shape: square 3, circle 1" in g.lines("cell", row=1)
    # the style row names its concept and the shape its one training image had
    assert "square" in g.text("note", row=1) and "mrv" in g.text("note", row=1)
    # the best row: framed in the best colour, tagged, and named in the footer
    assert g.best_rows == [3] and g.lines("tag") == ["BEST"] and [t.row for t in g.texts if t.role == "tag"] == [3]
    x0, y0, x1, y1 = g.row_boxes[3]
    px = g.image.load()
    assert px[x0 + 1, (y0 + y1) // 2] == grid_mod.BEST_COLOR and px[x1 - 1, (y0 + y1) // 2] == grid_mod.BEST_COLOR
    bx0, by0, _, by1 = g.row_boxes[2]
    assert px[bx0 + 1, (by0 + by1) // 2] != grid_mod.BEST_COLOR
    assert "timestep-split" in g.text("footer") and "BEST" in g.text("footer")
    for t in g.texts:
        assert t.fits, t
        assert t.width <= t.box[2] - t.box[0], t


def test_labels_fit_their_box_without_losing_words():
    long = "content LoRA alone, with a label far longer than its box of 120 pixels could ever hold"
    rows = [grid_mod.GridRow("content LoRA alone", torch.zeros(2, 3, 16, 16)),
            grid_mod.GridRow(long, torch.zeros(2, 3, 16, 16), notes=["Supercalifragilisticexpialidocious" * 2])]
    g = grid_mod.render_grid(rows, label_width=120)
    # wrapped between words, spaces kept (it was drawn as "content LoRAalone")
    assert g.text("label", row=0) == "content LoRA alone"
    assert all(set(ln.split()) <= {"content", "LoRA", "alone"} for ln in g.lines("label", row=0))
    wide = grid_mod.render_grid(rows[:1])
    assert wide.lines("label") == ["content LoRA alone"]
    assert g.text("label", row=1) == long and len(g.lines("label", row=1)) > 1
    assert "".join(g.lines("note", row=1)) == "Supercalifragilisticexpialidocious" * 2  # split, not clipped
    for t in g.texts:
        assert t.fits and t.width <= 120, t
        assert t.box[3] <= g.row_boxes[t.row][3]  # inside its row, not over the next one
    assert g.best_rows == [] and g.lines("tag") == []


def test_every_held_out_concept_is_described():
    for word in (*world.SUBJECTS, *world.STYLE_CONCEPTS):
        d = demo_cmd.describe_concept(word)
        assert d.startswith(f"{word} = ") and "held-out" not in d
    for style, shape in world.STYLE_CONCEPTS.items():
        assert demo_cmd.describe_concept(style).endswith(f"one image of a {shape}")


def test_demo_default_strategies_follow_the_registry():
    labels = [v.label for v in demo_variants(None)]
    assert labels[:2] == ["linear (1, 1)", "linear (0.5, 0.5)"]
    for extra in ("ziplora", "duolora"):
        assert (extra in labels) == (extra in available_strategies())


def test_demo_rejects_unknown_strategy(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--n", "1", "--strategies", "nope", "-o", str(tmp_path / "x.png")])
    assert r.exit_code != 0
    assert "unknown strategy" in str(r.exception or r.output)


def test_bench_variants_cover_registry_and_ablations():
    avail = available_strategies()
    vs = default_variants()
    strategies = {v.strategy for v in vs}
    two_input = {n for n, c in avail.items() if c.min_inputs <= 2 and (c.max_inputs is None or c.max_inputs >= 2)}
    assert strategies == two_input
    labels = [v.label for v in vs]
    assert "linear (1, 1)" in labels and "linear (0.5, 0.5)" in labels
    for name, abl in ABLATIONS.items():
        if name in avail:
            declared = {p.name for p in avail[name].params}
            for suffix, params in abl:
                assert (f"{name} ({suffix})" in labels) == set(params).issubset(declared)
    assert all(v.params == {} for v in default_variants(ablations=False))
