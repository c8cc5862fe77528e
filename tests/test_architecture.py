"""The layer rule of docs/architecture.md: a module imports only from its own floor or below, the package
has no import cycle, and package modules import each other at the top (imports inside functions are for
optional heavy dependencies only).  Seams resolved by name (registries of ``"module:attr"`` strings) are
not imports and are not seen here, by design."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lora_merge

ROOT = Path(lora_merge.__file__).parent

#: floor of each module prefix (longest prefix wins); the same table is drawn in docs/architecture.md
FLOORS = {
    "lora_merge.errors": 0,
    "lora_merge.adapter": 0,
    "lora_merge.linalg": 0,
    "lora_merge._version": 0,
    "lora_merge.arch": 1,
    "lora_merge.families": 1,  # model families as data (detection rules, names, tables); "module:attr" seams up
    "lora_merge.patterns": 1,
    "lora_merge.files": 1,
    "lora_merge.plugins": 1,
    "lora_merge.progress": 1,
    "lora_merge.formats": 2,
    "lora_merge.input_models": 2,
    "lora_merge.masks": 2,
    "lora_merge.priors": 2,
    "lora_merge.strategies": 3,
    "lora_merge.sampling_time": 3,  # declared with strategies.Param: the floor of strategies
    "lora_merge.klora": 3,  # re-exports of sampling_time
    "lora_merge.timestep_merge": 3,
    "lora_merge.analysis": 4,
    "lora_merge.engine": 5,
    "lora_merge.model_mode": 6,
    "lora_merge": 6,  # the package root: re-exports of the public API
    "lora_merge.__main__": 9,  # python -m lora_merge: the CLI
    "lora_merge.toyworld": 7,
    "lora_merge.bench": 8,
    "lora_merge.cli": 9,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(name: str) -> bool:
    return (ROOT.parent / Path(*name.split(".")) / "__init__.py").exists()


def _exists(name: str) -> bool:
    p = ROOT.parent / Path(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _floor(name: str) -> int:
    best = max((k for k in FLOORS if name == k or name.startswith(k + ".")), key=len)
    return FLOORS[best]


def _imports(path: Path):
    """(target module, line, inside a function) for every import of a lora_merge module in ``path``."""
    src = _module_name(path)
    pkg = src if _is_package(src) else src.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    func_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    func_lines.add(sub.lineno)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lora_merge":
                    yield alias.name, node.lineno, node.lineno in func_lines
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "lora_merge":
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                yield (sub if _exists(sub) else mod), node.lineno, node.lineno in func_lines


def _graph():
    edges = {}
    for path in sorted(ROOT.rglob("*.py")):
        src = _module_name(path)
        edges[src] = [(t, line, inner) for t, line, inner in _imports(path) if t != src]
    return edges


def test_no_import_points_up_the_floors():
    bad = []
    for src, targets in _graph().items():
        for t, line, _ in targets:
            if _floor(t) > _floor(src):
                bad.append(f"{src}:{line} imports {t} (floor {_floor(src)} → {_floor(t)})")
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def test_no_package_import_inside_a_function_outside_the_cli():
    # the CLI imports each command's library code lazily so `--help` stays fast; nothing else may hide an
    # import of the package inside a function
    bad = [
        f"{src}:{line} imports {t} inside a function"
        for src, targets in _graph().items()
        if not src.startswith("lora_merge.cli")
        for t, line, inner in targets
        if inner
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    edges = {s: {t for t, _, _ in ts if t in _graph_nodes()} for s, ts in _graph().items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _graph_nodes() -> set[str]:
    return {_module_name(p) for p in ROOT.rglob("*.py")}


@pytest.mark.parametrize("module", ["lora_merge.strategies", "lora_merge.engine", "lora_merge"])
def test_core_imports_no_diffusers(module):
    code = (
        f"import sys, {module} as m; from lora_merge.strategies import available_strategies; "
        "available_strategies(); "
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('diffusers', 'transformers', 'peft', "
        "'accelerate') or k.startswith('lora_merge.model_mode') or k.startswith('lora_merge.toyworld')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
