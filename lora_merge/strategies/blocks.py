"""``blocks``: B-LoRA-style block selection — each layer comes from the input(s) whose pattern matches it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import MergeError, UsageError
from ..patterns import compile_pattern
from . import register
from .base import LayerContext, LayerInput, LayerResult, MergePlan, MergeStrategy, Param
from .linear import concat

#: preset name -> rules "INPUT:PATTERN" (input numbers are 1-based: 1 = content, 2 = style)
PRESETS: dict[str, str] = {
    # Frenkel et al. (B-LoRA): on SDXL up_blocks.0.attentions.0 carries content, .1 carries style
    "b-lora-sdxl": "1:up_blocks.0.attentions.0,2:up_blocks.0.attentions.1",
    # SD 1.x analogue (not from the paper): the first two attentions of the first up block that has
    # attention (up_blocks.1, latent 16 at 512 px; SDXL's up_blocks.0 is the first one there)
    "b-lora-sd1": "1:up_blocks.1.attentions.0,2:up_blocks.1.attentions.1",
}


def parse_rules(spec: str, n_inputs: int) -> list[tuple[int, str]]:
    rules = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        num, sep, pattern = part.partition(":")
        if not sep or not num.strip().isdigit() or not pattern.strip():
            raise UsageError(f"blocks rule {part!r}: expected INPUT:PATTERN, e.g. 1:up_blocks.0.attentions.0")
        i = int(num)
        if not 1 <= i <= n_inputs:
            raise UsageError(f"blocks rule {part!r}: input {i} does not exist ({n_inputs} inputs)")
        compile_pattern(pattern.strip())
        rules.append((i - 1, pattern.strip()))
    if not rules:
        raise UsageError("blocks: no rules; pass --preset or --take 'INPUT:PATTERN,...'")
    return rules


@register
class Blocks(MergeStrategy):
    name = "blocks"
    description = "B-LoRA-style: take named blocks/patterns from each input (content from 1, style from 2)."
    reference = "Frenkel et al., Implicit Style-Content Separation using B-LoRA, ECCV 2024 (arXiv 2403.14572)"
    exact = True
    params = (
        Param(
            "preset",
            str,
            "b-lora-sdxl",
            "named rule set: " + "; ".join(f"{k} = {v}" for k, v in PRESETS.items()),
            choices=tuple(PRESETS),
        ),
        Param(
            "take",
            str,
            None,
            "rules 'INPUT:PATTERN,...' (1-based inputs; patterns as for --weight); overrides --preset",
        ),
        Param(
            "rest",
            str,
            "drop",
            "layers no rule matches: drop (zero update), sum (weighted sum of all inputs) or an input number",
        ),
    )

    def prepare(self, plan: MergePlan) -> None:
        inputs = plan.adapters
        n = len(inputs)
        self.rules = parse_rules(self.config["take"] if self.config["take"] else PRESETS[self.config["preset"]], n)
        rest = str(self.config["rest"])
        if rest not in ("drop", "sum") and not (rest.isdigit() and 1 <= int(rest) <= n):
            raise UsageError(f"blocks --rest {rest!r}: expected drop, sum or an input number 1..{n}")
        for i, pattern in self.rules:
            rx = compile_pattern(pattern)
            if not any(rx.search(name) for name in inputs[i].modules):
                raise MergeError(
                    f"blocks: pattern {pattern!r} matches no module of input {i + 1} "
                    f"({inputs[i].display_name}); arch {plan.arch!r} — wrong preset for this model?"
                )
        self._taken = {i: 0 for i in range(n)}

    def merge_layer(self, inputs: Sequence[LayerInput], ctx: LayerContext) -> LayerResult:
        chosen = sorted({i for i, p in self.rules if compile_pattern(p).search(ctx.name)})
        source = "rule"
        if not chosen:
            source = "rest"
            if self.config["rest"] == "drop":
                chosen = []
            elif self.config["rest"] == "sum":
                chosen = list(range(len(inputs)))
            else:
                chosen = [int(self.config["rest"]) - 1]
        for i in chosen:
            self._taken[i] += int(inputs[i].present)
        sel = [
            x if i in chosen else LayerInput(x.up[:, :0], x.down[:0], 0.0, 0.0, False)
            for i, x in enumerate(inputs)
        ]
        up, down = concat(sel)
        return LayerResult(up=up, down=down, info={"from_inputs": [i + 1 for i in chosen], "by": source})

    def report(self) -> dict[str, Any]:
        return {
            "layers_taken_per_input": {str(i + 1): k for i, k in self._taken.items()},
            "rules": [[i + 1, p] for i, p in self.rules],
        }
