"""The code's structure, checked like its behaviour: layer contracts (import-linter), no import cycle
among src/ modules (every import statement, lazy ones included), and ruff's lint rules."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "moemesh"


def module_imports(src: Path) -> dict[str, set[str]]:
    """module name -> the moemesh modules it imports (relative imports resolved; a package's own
    __init__ is not an edge back to it)."""
    mods = {}
    for p in src.rglob("*.py"):
        rel = p.relative_to(src.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.parts[-1] == "__init__" else rel.parts)] = p
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles_in_src() -> None:
    found = cycles(module_imports(SRC))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_check_finds_a_planted_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "moemesh"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from .y import f\n")
    (pkg / "a" / "y.py").write_text("def f():\n    from moemesh.a import x\n")
    assert cycles(module_imports(pkg)) == [["moemesh.a.x", "moemesh.a.y"]]


def _tool(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[test]')")
    return found


def test_layer_contracts_hold() -> None:
    """pyproject.toml [tool.importlinter]: each layer imports only the layers below it."""
    res = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_ruff_is_clean() -> None:
    res = subprocess.run([_tool("ruff"), "check", "src", "tests", "bench"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-4000:]


def test_layer_contracts_catch_a_planted_back_import(tmp_path: Path) -> None:
    """The contract is not vacuous: a copy of the package whose quant layer imports the server breaks it."""
    import os

    shutil.copytree(SRC, tmp_path / "src" / "moemesh", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    init = tmp_path / "src" / "moemesh" / "quant" / "__init__.py"
    init.write_text(init.read_text() + "\nfrom ..server import app  # planted back-import\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    res = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode != 0 and "moemesh.quant is not allowed to import moemesh.server" in res.stdout, res.stdout[-3000:]


def test_architecture_lists_every_module() -> None:
    """docs/architecture.md's module table (scripts/module_map.py) names every module of src/moemesh."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    src = ROOT / "src" / "moemesh"
    missing = [str(p.relative_to(src)) for p in sorted(src.rglob("*"))
               if p.suffix in (".py", ".c", ".h") and p.name != "__init__.py" and f"`{p.relative_to(src)}`" not in doc]
    assert not missing, f"not in docs/architecture.md (run scripts/module_map.py): {missing}"
