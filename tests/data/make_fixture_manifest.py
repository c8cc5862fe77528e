"""Regenerate ``tests/data/fixture_shapes.json`` from the real-world adapter files.

The test suite uses seven LoRA adapters published by other people (see ``tests/data/README.md``).  Their
licences are not stated, so the files themselves are not part of this repository.  What the repository
keeps is this manifest of configuration facts about each of them: every tensor key with its shape and
dtype, the mean and standard deviation of its values, the safetensors metadata and (for a PEFT folder)
the ``adapter_config.json``.  ``tests/conftest.py`` writes look-alike files from it (same keys, shapes,
dtypes, metadata and config; seeded random values at the recorded scale) when the real files are absent.

Usage, from the project root, on a machine that has the real files::

    python tests/data/make_fixture_manifest.py [FIXTURES_DIR]

``FIXTURES_DIR`` (default: ``$LORA_MERGE_REAL_FIXTURES``, else the maintainers' fixtures folder that
``tests/conftest.py`` looks for) must hold ``sd15/<name>.safetensors`` and ``peft/<name>/`` folders.  The
output is deterministic (sorted keys, statistics rounded to 4 significant digits).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MANIFEST = HERE / "fixture_shapes.json"

#: every fixture: (path under the fixtures folder, source repository on GitHub, what it is)
SOURCES = {
    "sd15/pokemon_style.safetensors": (
        "wellCh4n/pokemon-diffusers", "SD 1.5 UNet attention LoRA, old diffusers attention-processor names"),
    "sd15/rick_and_morty_style.safetensors": (
        "qwerty-aditya/rick_and_morty_LoRA", "SD 1.5 UNet attention LoRA, old diffusers attention-processor names"),
    "sd15/course3_unet_prefixed.safetensors": (
        "mvclab-ntust-course/course3-B11115019", "SD 1.5 UNet attention LoRA, `unet.`-prefixed LoRACompatible names"),
    "sd15/sd_lora_2100.safetensors": (
        "timohavdk/sd-lora", "SD 1.5 UNet attention LoRA, `unet.`-prefixed LoRACompatible names"),
    "peft/distilbert_emotion": (
        "dayanidhi04/emotion-classification-distilbert-lora", "PEFT folder, distilbert-base-uncased, 6-class head"),
    "peft/distilbert_imdb": (
        "Tashu014/lora-imdb-distilbert", "PEFT folder, distilbert-base-uncased, 2-class head"),
    "peft/gpt2_tigrinya": (
        "abrhaleyarefaine1997/gpt2-tigrinya-lora", "PEFT folder, gpt2, fan_in_fan_out"),
}

ABOUT = (
    "Configuration facts about seven LoRA adapters published by other people (tests/data/README.md names "
    "each source repository). Key names, shapes, dtypes, metadata, adapter configs and two summary "
    "statistics per tensor; no trained values. tests/conftest.py writes look-alike files from this when the "
    "real files are absent. Regenerate with: python tests/data/make_fixture_manifest.py FIXTURES_DIR"
)


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def describe_safetensors(path: Path) -> dict:
    """Metadata and ``{key: {shape, dtype, mean, std}}`` of one safetensors file (float64 statistics)."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            x = t.double()
            tensors[key] = {
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "mean": _sig(float(x.mean())) if x.numel() else 0.0,
                "std": _sig(float(x.std())) if x.numel() > 1 else 0.0,
            }
            assert t.dtype.is_floating_point, f"{path}: {key} is {t.dtype}; the generator writes floats only"
    return {"metadata": dict(sorted(metadata.items())), "tensors": tensors}


def build(root: Path) -> dict:
    fixtures = {}
    for rel, (source, what) in SOURCES.items():
        p = root / rel
        if not p.exists():
            raise SystemExit(f"error: {p} not found")
        entry = {"source": f"https://github.com/{source}", "what": what}
        if p.is_dir():
            entry["adapter_config"] = json.loads((p / "adapter_config.json").read_text())
            entry["files"] = {"adapter_model.safetensors": describe_safetensors(p / "adapter_model.safetensors")}
        else:
            entry["files"] = {p.name: describe_safetensors(p)}
        fixtures[rel] = entry
    return {"about": ABOUT, "fixtures": fixtures}


def dump(manifest: dict) -> str:
    """JSON with one tensor per line: small diffs when a fixture changes, still plain ``json.loads``."""
    lines = ["{", f'  "about": {json.dumps(manifest["about"])},', '  "fixtures": {']
    items = list(manifest["fixtures"].items())
    for i, (rel, entry) in enumerate(items):
        lines.append(f"    {json.dumps(rel)}: {{")
        lines.append(f'      "source": {json.dumps(entry["source"])},')
        lines.append(f'      "what": {json.dumps(entry["what"])},')
        if "adapter_config" in entry:
            lines.append(f'      "adapter_config": {json.dumps(entry["adapter_config"])},')
        lines.append('      "files": {')
        files = list(entry["files"].items())
        for j, (name, desc) in enumerate(files):
            lines.append(f"        {json.dumps(name)}: {{")
            lines.append(f'          "metadata": {json.dumps(desc["metadata"])},')
            lines.append('          "tensors": {')
            tens = list(desc["tensors"].items())
            for k, (key, t) in enumerate(tens):
                comma = "," if k < len(tens) - 1 else ""
                lines.append(f"            {json.dumps(key)}: {json.dumps(t)}{comma}")
            lines.append("          }")
            lines.append("        }" + ("," if j < len(files) - 1 else ""))
        lines.append("      }")
        lines.append("    }" + ("," if i < len(items) - 1 else ""))
    lines += ["  }", "}", ""]
    text = "\n".join(lines)
    assert json.loads(text) == json.loads(json.dumps(manifest))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("LORA_MERGE_REAL_FIXTURES") or str(REPO.parent / "shared" / "fixtures")
    ap.add_argument("fixtures_dir", nargs="?", default=default, help="folder with sd15/ and peft/")
    ap.add_argument("-o", "--output", default=str(MANIFEST))
    args = ap.parse_args(argv)
    text = dump(build(Path(args.fixtures_dir)))
    Path(args.output).write_text(text)
    print(f"wrote {args.output} ({len(text) // 1024} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
