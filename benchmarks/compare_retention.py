"""Joint retention of ziplora / duolora vs the direct (linear) merge — the table in docs/ziplora-duolora.md.

    python benchmarks/compare_retention.py            # prints markdown tables

Pairs: the two real SD 1.5 style LoRAs of ../shared/fixtures (Pokémon + Rick and Morty, rank 4, 128
modules), and a synthetic pair with the same 128 SD 1.5 module shapes at rank 8 whose style input
directions overlap the content LoRA's by half.  Metric (lora_merge.analysis.fidelity): per layer content and
style retention under the ``subspace`` input model, then the mean over layers of each and of
``min(content, style)`` ("joint").  Input 1 = content, input 2 = style.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import lora_merge as lm
from lora_merge.analysis.fidelity import evaluate

sys.path.insert(0, str(Path(__file__).parent))
from sdxl_pair import synthetic_pair

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "sd15"
OFF = {"lambda_prior": 0.0, "lambda_cycle": 0.0, "prior_init": False}
ROWS = [
    ("linear (1, 1)", "linear", [1.0, 1.0], {}),
    ("linear (0.5, 0.5)", "linear", [0.5, 0.5], {}),
    ("ziplora (defaults: axis out)", "ziplora", None, {}),
    ("ziplora --axis in", "ziplora", None, {"axis": "in"}),
    ("ziplora --steps 0 (closed form only)", "ziplora", None, {"steps": 0}),
    ("duolora (defaults)", "duolora", None, {}),
    ("duolora: ZipRank alone", "duolora", None, dict(OFF)),
    ("duolora: + priors", "duolora", None, {"lambda_cycle": 0.0}),
    ("duolora: + priors + Constyle", "duolora", None, {}),
    ("duolora --lambda-prior 0.1 (paper weight)", "duolora", None, {"lambda_prior": 0.1}),
    ("duolora --input-model identity", "duolora", None, {"input_model": "identity"}),
]


#: the table measures the masks as solved (``--strength free``) with DuoLoRA's prior init: the defaults when
#: it was recorded; the retention they maximise is a per-layer weight-space number (docs/ziplora-duolora.md)
AS_RECORDED = {"ziplora": {"strength": "free"}, "duolora": {"strength": "free", "prior_init": True}}


def table(title: str, content, style, arch: str) -> str:
    lines = [f"### {title}", "", "| merge | content | style | joint | time (s) |", "|---|---:|---:|---:|---:|"]
    for label, strategy, weights, params in ROWS:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = lm.merge([content, style], None, strategy=strategy, weights=weights,
                              params={**AS_RECORDED.get(strategy, {}), **params}, arch=arch).adapter  # fmt: skip
        dt = time.perf_counter() - t
        m = evaluate(content, style, merged)["mean"]
        lines.append(f"| {label} | {m['content']:.4f} | {m['style']:.4f} | {m['joint']:.4f} | {dt:.2f} |")
    return "\n".join(lines)


def main() -> None:
    if not FIXTURES.exists():
        sys.exit(f"fixtures not found: {FIXTURES}")
    c = lm.load(FIXTURES / "pokemon_style.safetensors")
    s = lm.load(FIXTURES / "rick_and_morty_style.safetensors")
    print(table("Real SD 1.5 pair: pokemon_style (content) + rick_and_morty_style (style), rank 4", c, s, "sd1"))
    print()
    layout = {n: (m.out_features, m.in_features) for n, m in c.modules.items()}
    sc, ss = synthetic_pair(layout, rank=8, overlap=0.5, seed=0)
    print(table("Synthetic pair on the same 128 SD 1.5 shapes, rank 8, input directions overlapping by half",
                sc, ss, "sd1"))  # fmt: skip


if __name__ == "__main__":
    main()
