"""``lora-merge bench quality``: every strategy on every content–style pair of the toy-world suite.

For each pair (:mod:`lora_merge.toyworld.suite`) the runner merges the pair's two LoRA files with every row
of :func:`lora_merge.bench.variants.suite_variants`, samples the joint prompt on fixed *test* seeds and
scores the images (:mod:`lora_merge.bench.metrics`).  Beside the strategies it measures what a reader
needs to trust the rows: each LoRA's strength curve, leakage and prompt binding, a ceiling per pair, and
the baselines a user would try by hand — the direct sum, the average, and **tuned linear** (the best
weights of a grid, chosen on separate *validation* seeds).

Every row is cached as one JSON file keyed by what determines it (pair, row, n, seeds, sampler, the
LoRA, base and judge files), so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import load
from .._version import __version__
from ..engine import merge
from ..errors import LoraMergeError
from ..files import atomic_write_json, input_sha256, make_dirs
from ..sampling_time import available_sampling_time, get_sampling_time
from ..sampling_time import build as build_sampling_merger
from ..strategies import available_strategies
from ..toyworld import world
from ..toyworld.judge import load_judge, per_class_accuracy
from ..toyworld.model import DATA_DIR, load_base
from ..toyworld.sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, sample
from ..toyworld.suite import SUITE, Pair, style_check_prompts, unbound_prompts
from ..toyworld.train import LORA_DIR, content_training_set, lora_file, style_reference
from .metrics import judge_metrics, paired_bootstrap_ci
from .quality import base_sanity, eval_seeds, trainable_values
from .variants import Variant

#: scales of each LoRA's strength curve
STRENGTHS = (0.25, 0.5, 0.6, 0.75, 1.0, 1.25, 1.5)
#: ``--quick``'s: the recipe's two targets and one point below
QUICK_STRENGTHS = (0.5, 0.6, 1.0)
#: tuned linear's grid, per input
TUNE_GRID = (0.4, 0.6, 0.8, 1.0, 1.2)
#: validation seeds live far from the test seeds (test: ``seed·1000003 + i``)
VALIDATION_OFFSET = 10**9

Progress = Callable[[str], None]
#: rows that merge while sampling (no file), by strategy name
SAMPLING_TIME = tuple(available_sampling_time())


def validation_seeds(n: int, seed: int = 0) -> list[int]:
    return [VALIDATION_OFFSET + seed * 1_000_003 + i for i in range(n)]


@dataclass
class SuiteSettings:
    n: int = 64
    val_n: int = 16
    seed: int = 0
    steps: int = DEFAULT_STEPS
    lora_dir: Path = LORA_DIR
    cache: Path | None = None
    grid: tuple[float, ...] = TUNE_GRID
    strengths: tuple[float, ...] = STRENGTHS
    keep_images: int = 16


@dataclass
class World:
    """The loaded base model and judge, shared by every row."""

    model: Any
    judge: Any
    fingerprint: str

    @classmethod
    def load(cls) -> World:
        files = [DATA_DIR / "base" / "unet.safetensors", DATA_DIR / "base" / "text_encoder.safetensors",
                 DATA_DIR / "judge.safetensors"]
        fp = hashlib.sha256("".join(input_sha256(f) or "" for f in files).encode()).hexdigest()[:16]
        return cls(load_base(), load_judge(), fp)


@dataclass
class RowCache:
    """One JSON file per row under ``folder`` (no caching when ``folder`` is None)."""

    folder: Path | None
    hits: int = 0
    misses: int = 0

    def get(self, key: str) -> dict[str, Any] | None:
        if self.folder is None:
            return None
        p = self.folder / f"{key}.json"
        if not p.is_file():
            return None
        try:
            out = json.loads(p.read_text())
        except (OSError, ValueError):  # a torn or foreign file is recomputed, never trusted
            return None
        self.hits += 1
        return out

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.misses += 1
        if self.folder is not None:
            make_dirs(self.folder)
            atomic_write_json(self.folder / f"{key}.json", value, indent=None)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Runner:
    """Evaluates rows of the suite with caching; images of the latest rows are kept for the grids."""

    def __init__(self, settings: SuiteSettings, world_: World | None = None, progress: Progress | None = None):
        self.s = settings
        self.w = world_ or World.load()
        self.cache = RowCache(settings.cache)
        self.progress = progress or (lambda msg: None)
        self.images: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self._lora_sha: dict[str, str] = {}

    # ---------------------------------------------------------------- primitives
    def lora_path(self, word: str) -> Path:
        return Path(self.s.lora_dir) / lora_file(word)

    def lora_sha(self, word: str) -> str:
        if word not in self._lora_sha:
            self._lora_sha[word] = input_sha256(self.lora_path(word)) or ""
        return self._lora_sha[word]

    def refs(self, pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
        return content_training_set(pair.subject)[0], style_reference(pair.style)[0][None]

    def judge_prompts(self, prompts: Sequence[str], seeds: Sequence[int], adapter: Any, scale: float = 1.0,
                      shape: str | None = None, style: str | None = None, pair: Pair | None = None,
                      merger: Any = None) -> tuple[dict[str, Any], torch.Tensor]:
        prompts = list(prompts)
        per_seed = [prompts[i % len(prompts)] for i in range(len(seeds))]
        imgs = sample(self.w.model, per_seed, list(seeds), adapter=adapter, scale=scale, steps=self.s.steps,
                      merger=merger)
        crefs, srefs = self.refs(pair) if pair is not None else (None, None)
        m = judge_metrics(imgs, self.w.judge, shape, style, crefs, srefs, seed=self.s.seed)
        return m, imgs

    def cached(self, key_parts: tuple, compute: Callable[[], tuple[dict[str, Any], torch.Tensor | None]],
               label: str, group: str | None = None) -> dict[str, Any]:
        key = _key(__version__, self.w.fingerprint, self.s.steps, DEFAULT_GUIDANCE, *key_parts)
        hit = self.cache.get(key)
        if hit is not None:
            self.progress(f"{label} (cached)")
            out, imgs = hit, None
            if "images" in hit:
                imgs = torch.tensor(hit["images"], dtype=torch.uint8)
        else:
            self.progress(label)
            out, imgs_f = compute()
            imgs = None if imgs_f is None else world.to_uint8(imgs_f[: self.s.keep_images])
            store = dict(out)
            if imgs is not None:
                store["images"] = imgs.tolist()
            self.cache.put(key, store)
        if group is not None and imgs is not None:
            self.images.setdefault(group, []).append((label, imgs))
        return {k: v for k, v in out.items() if k != "images"}

    # ---------------------------------------------------------------- each LoRA alone
    def lora_report(self, word: str) -> dict[str, Any]:
        """Strength curve on its own prompt(s), leakage on the joint prompts of its pairs, binding on
        prompts without its trigger word."""
        is_subject = word in world.SUBJECTS
        path = self.lora_path(word)
        sha = self.lora_sha(word)
        n = self.s.n
        seeds = eval_seeds(n, self.s.seed)
        if is_subject:
            own_prompts, shape, style = [world.caption(word, None)], word, None
        else:
            own_prompts, shape, style = style_check_prompts(word), None, word
        curve = []
        for sc in self.s.strengths:
            def run(sc=sc):
                m, imgs = self.judge_prompts(own_prompts, seeds, path, scale=sc, shape=shape, style=style)
                return {"scale": sc, "acc": m["joint_acc"], "n": n}, imgs
            curve.append(self.cached(("strength", word, sha, sc, n, self.s.seed), run,
                                     f"{word} LoRA alone at scale {sc}"))
        # every suite pair with this word (not only the selected ones), so the row is the same in any run
        leak_prompts = [p.joint_prompt for p in SUITE if word in (p.subject, p.style)]
        if is_subject:  # does it keep its photos' style on a prompt asking for another?
            leak_shape, leak_style, leak_what = None, world.SUBJECTS[word], f"keeps its photos' style ({world.SUBJECTS[word]})"
        else:  # does it draw its reference image's shape instead of the asked subject?
            leak_shape, leak_style, leak_what = world.STYLE_CONCEPTS[word], None, f"draws its reference shape ({world.STYLE_CONCEPTS[word]})"
        leakage = None
        if leak_prompts:
            def run_leak():
                m, imgs = self.judge_prompts(leak_prompts, seeds, path, shape=leak_shape, style=leak_style)
                return {"rate": m["joint_acc"], "what": leak_what, "prompts": leak_prompts, "n": n}, imgs
            leakage = self.cached(("leak", word, sha, tuple(leak_prompts), n, self.s.seed), run_leak,
                                  f"{word} LoRA leakage")
        unbound = unbound_prompts(word)

        def run_bind():
            m, imgs = self.judge_prompts(unbound, seeds, path, shape=shape, style=style)
            return {"rate": m["joint_acc"], "prompts": unbound, "n": n}, imgs
        binding = self.cached(("bind", word, sha, tuple(unbound), n, self.s.seed), run_bind,
                              f"{word} LoRA binding")
        at1 = next((c["acc"] for c in curve if c["scale"] == 1.0), None)
        at06 = _interp(curve, 0.6)  # the measured point when the curve has one
        return {"word": word, "kind": "content" if is_subject else "style", "file": str(path), "sha256": sha,
                "prompts": own_prompts, "curve": curve, "acc_at_1": at1, "acc_at_0.6": at06,
                "leakage": leakage, "binding": binding,
                "meets_recipe": bool(at1 is not None and at1 >= 0.9 and at06 is not None and at06 >= 0.6)}

    # ---------------------------------------------------------------- rows
    def merge_row(self, pair: Pair, v: Variant) -> dict[str, Any]:
        c, s = self.lora_path(pair.subject), self.lora_path(pair.style)
        seeds = eval_seeds(self.s.n, self.s.seed)
        key = ("row", pair.name, v.label, v.strategy, strategy_fingerprint(v.strategy, v.params), list(v.weights),
               self.lora_sha(pair.subject), self.lora_sha(pair.style), self.s.n, self.s.seed)

        def run():
            if v.prepare is not None:
                v.prepare()
            t0 = time.perf_counter()
            if v.strategy in SAMPLING_TIME:  # no file: the merger picks a LoRA per layer and step while sampling
                merger = build_sampling_merger(v.strategy, load(c), load(s), weights=v.weights, **v.params)
                m, imgs = self.judge_prompts([pair.joint_prompt], seeds, None, shape=pair.subject,
                                             style=pair.style, pair=pair, merger=merger)
                counts = [r.counts for r in merger.records]
                total = sum(x["content"] + x["style"] for x in counts)
                share = sum(x["style"] for x in counts) / total if total else None
                m.update(merge_seconds=None, trainable_values=None, rank=None, style_layer_share=share,
                         gamma=getattr(merger, "gamma", None), sample_seconds=time.perf_counter() - t0)
                return m, imgs
            with warnings.catch_warnings(record=True) as caught:  # kept in the row, not printed over the status
                warnings.simplefilter("always")
                res = merge([c, s], None, strategy=v.strategy, weights=list(v.weights), params=v.params or None,
                            seed=self.s.seed, arch="toyworld")
            dt = time.perf_counter() - t0
            m, imgs = self.judge_prompts([pair.joint_prompt], seeds, res.adapter, shape=pair.subject,
                                         style=pair.style, pair=pair)
            m.update(merge_seconds=dt, trainable_values=trainable_values(res.report),
                     rank=max(res.adapter.ranks) if len(res.adapter) else 0,
                     warnings=sorted({type(w.message).__name__ for w in caught}))
            return m, imgs
        try:
            out = self.cached(key, run, f"{pair.name}: {v.label}", group=pair.name)
        except LoraMergeError as exc:  # a strategy that cannot merge these inputs is a row, not a crash
            return {**row_head(v), "error": str(exc)}
        return {**row_head(v), **out}

    def alone_row(self, pair: Pair, which: str) -> dict[str, Any]:
        word = pair.subject if which == "content" else pair.style
        seeds = eval_seeds(self.s.n, self.s.seed)
        key = ("alone", pair.name, which, self.lora_sha(word), self.s.n, self.s.seed)

        def run():
            return self.judge_prompts([pair.joint_prompt], seeds, self.lora_path(word), shape=pair.subject,
                                      style=pair.style, pair=pair)
        label = f"{which} LoRA alone"
        out = self.cached(key, run, f"{pair.name}: {label}", group=pair.name)
        return {"label": label, "strategy": None, "mode": "alone", "params": {}, "weights": None, **out}

    def tuned_linear(self, pair: Pair) -> dict[str, Any]:
        """The best grid weights on validation seeds, then scored on the test seeds."""
        val = validation_seeds(self.s.val_n, self.s.seed)
        c, s = self.lora_path(pair.subject), self.lora_path(pair.style)
        shas = (self.lora_sha(pair.subject), self.lora_sha(pair.style))

        def score(wc: float, ws: float) -> dict[str, Any]:
            key = ("tune", pair.name, wc, ws, *shas, self.s.val_n, self.s.seed)

            def run():
                ad = merge([c, s], None, strategy="linear", weights=[wc, ws], arch="toyworld").adapter
                m, _ = self.judge_prompts([pair.joint_prompt], val, ad, shape=pair.subject, style=pair.style,
                                          pair=pair)
                return {k: m.get(k) for k in ("joint_acc", "content_acc", "style_acc", "hmean_sim")}, None
            return self.cached(key, run, f"{pair.name}: tuning linear ({wc}, {ws}) on validation seeds")

        best, scores = tune_linear(self.s.grid, score)
        row = self.merge_row(pair, Variant("tuned linear", "linear", weights=best))
        row.update(mode="tuned", tuned_weights=list(best), validation={"n": self.s.val_n, "seeds": "validation",
                                                                       "scores": scores})
        return row


def strategy_fingerprint(strategy: str, params: dict[str, Any]) -> list[Any]:
    """What a row's result depends on besides the inputs: the strategy's resolved settings (its declared
    defaults included, so changing a default recomputes the row) and the source of the module that
    implements it (so does editing it; code it calls elsewhere is not covered: ``--no-cache``)."""
    if strategy in SAMPLING_TIME:
        merger = get_sampling_time(strategy)
        return [merger.resolve(params), _class_sha(merger)]
    cls = available_strategies()[strategy]
    return [cls(**params).config, _class_sha(cls)]


def _class_sha(cls: type) -> list[str]:
    """Source hashes of the modules defining ``cls`` and its lora-merge base classes."""
    mods = dict.fromkeys(k.__module__ for k in cls.__mro__ if k.__module__.startswith("lora_merge"))
    return [_source_sha(sys.modules[m]) for m in mods]


def _source_sha(module: Any) -> str:
    path = inspect.getsourcefile(module)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else ""


def row_head(v: Variant) -> dict[str, Any]:
    mode = "model" if v.params.get("mode") == "model" else (v.params.get("mode") or "weights")
    if v.strategy in SAMPLING_TIME:
        mode = "sampling"
    return {"label": v.label, "strategy": v.strategy, "mode": mode, "params": v.params,
            "weights": list(v.weights)}


def tune_linear(grid: Sequence[float], score: Callable[[float, float], dict[str, Any]]
                ) -> tuple[tuple[float, float], list[dict[str, Any]]]:
    """Pick the weights ``(w_c, w_s)`` of ``grid × grid`` with the best validation joint accuracy (ties:
    higher similarity harmonic mean, then the smaller total weight).  ``score`` sees validation only."""
    scores = []
    for wc in grid:
        for ws in grid:
            r = score(float(wc), float(ws))
            scores.append({"weights": [float(wc), float(ws)], **r})
    best = max(scores, key=lambda r: (r["joint_acc"] or 0.0, r.get("hmean_sim") or 0.0, -sum(r["weights"])))
    return (best["weights"][0], best["weights"][1]), scores


def _interp(curve: list[dict[str, Any]], x: float) -> float | None:
    pts = sorted((c["scale"], c["acc"]) for c in curve if c.get("acc") is not None)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


# ------------------------------------------------------------------------------------------- the run
def run_suite(pairs: Sequence[Pair], variants_for: Callable[[Pair], list[Variant]], settings: SuiteSettings,
              progress: Progress | None = None, world_: World | None = None) -> dict[str, Any]:
    """Every pair: the LoRAs alone, the baselines, every variant; then the means over pairs."""
    t0 = time.perf_counter()
    runner = Runner(settings, world_, progress)
    words = list(dict.fromkeys([p.subject for p in pairs] + [p.style for p in pairs]))
    acc = per_class_accuracy(runner.w.judge)
    sanity = base_sanity(world_model=runner.w.model, judge=runner.w.judge)
    loras = {w: runner.lora_report(w) for w in words}
    out_pairs = []
    for pair in pairs:
        content_acc = loras[pair.subject]["acc_at_1"]
        style_acc = loras[pair.style]["acc_at_1"]
        rows = [runner.alone_row(pair, "content"), runner.alone_row(pair, "style")]
        rows.append(runner.merge_row(pair, Variant("linear (1, 1)", "linear")))
        rows.append(runner.merge_row(pair, Variant("linear (0.5, 0.5)", "linear", weights=(0.5, 0.5))))
        rows.append(runner.tuned_linear(pair))
        for v in variants_for(pair):
            if v.label in {r["label"] for r in rows}:
                continue
            rows.append(runner.merge_row(pair, v))
        ceiling = min(content_acc or 0.0, style_acc or 0.0)
        out_pairs.append({"name": pair.name, "subject": pair.subject, "style": pair.style,
                          "joint_prompt": pair.joint_prompt, "ceiling": ceiling,
                          "content_lora_acc": content_acc, "style_lora_acc": style_acc, "rows": rows})
    mean = suite_means(out_pairs, settings.seed)
    direct = {p["name"]: next(r for r in p["rows"] if r["label"] == "linear (1, 1)") for p in out_pairs}
    failing = [name for name, r in direct.items()
               if r.get("joint_acc") is not None
               and r["joint_acc"] < 0.6 * next(p["ceiling"] for p in out_pairs if p["name"] == name)]
    return {
        "version": __version__,
        "settings": {"n": settings.n, "val_n": settings.val_n, "seed": settings.seed, "steps": settings.steps,
                     "guidance": DEFAULT_GUIDANCE, "grid": list(settings.grid),
                     "strengths": list(settings.strengths)},
        "judge": {"per_class": acc, "shape_min": min(acc["shape"].values()),
                  "style_min": min(acc["style"].values())},
        "sanity": {k: v for k, v in sanity.items() if k not in ("images", "combos")},
        "loras": list(loras.values()),
        "pairs": [{**p, "rows": [_public(r) for r in p["rows"]]} for p in out_pairs],
        "mean": mean,
        "direct_fails": {"threshold": "joint < 0.6 × ceiling", "pairs": failing, "count": len(failing),
                         "of": len(out_pairs)},
        "seconds": time.perf_counter() - t0,
        "cache": {"hits": runner.cache.hits, "computed": runner.cache.misses},
        "_images": runner.images,
    }


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "per_image"}


def suite_means(pairs: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Per row label present in every pair: the mean over pairs with a bootstrap interval (images
    resampled within each pair), and the mean ceiling."""
    if not pairs:
        return []
    labels = [r["label"] for r in pairs[0]["rows"]]
    mean_ceiling = sum(p["ceiling"] for p in pairs) / len(pairs)
    out = []
    for label in labels:
        rows = [next((r for r in p["rows"] if r["label"] == label), None) for p in pairs]
        if any(r is None or r.get("error") or r.get("joint_acc") is None for r in rows):
            continue
        entry: dict[str, Any] = {"label": label, "strategy": rows[0]["strategy"], "mode": rows[0]["mode"],
                                 "ceiling": mean_ceiling, "pairs": len(rows)}
        for key in ("joint_acc", "content_acc", "style_acc", "subject_sim", "style_sim", "hmean_sim"):
            vals = [r.get(key) for r in rows]
            entry[key] = None if any(v is None for v in vals) else sum(vals) / len(vals)
        entry["joint_ci"] = list(paired_bootstrap_ci([r["per_image"]["joint_acc"] for r in rows], seed=seed))
        entry["per_pair_joint"] = {p["name"]: r["joint_acc"] for p, r in zip(pairs, rows)}
        out.append(entry)
    return out


__all__ = [
    "STRENGTHS",
    "TUNE_GRID",
    "Runner",
    "SuiteSettings",
    "World",
    "eval_seeds",
    "run_suite",
    "suite_means",
    "tune_linear",
    "validation_seeds",
]
