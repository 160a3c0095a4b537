"""Print docs/architecture.md's module table: one line per module of src/moemesh, from the first
sentence of its docstring (C sources and headers: their first comment line). Run after adding or
moving a module; tests/test_structure.py checks that every module is listed."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "moemesh"


def first_sentence(text: str, limit: int = 170) -> str:
    text = " ".join(text.split())
    m = re.search(r"(?<=[a-z0-9)\]`'])(?<!e\.g)(?<!i\.e)[.;](\s+(?=[A-Z(`*])|$)", text)
    s = text[: m.start() + 1] if m else text
    s = s.rstrip(".;")
    return s if len(s) <= limit else s[: limit - 3].rsplit(" ", 1)[0] + " ..."


def describe(path: Path) -> str:
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        return first_sentence(doc.split("\n\n")[0])
    lines = []
    for line in path.read_text().splitlines():  # C: the first comment block
        stripped = line.strip()
        if not stripped.startswith(("/*", "*", "//")):
            break
        lines.append(stripped.lstrip("/*").rstrip("*/").strip())
    return first_sentence(" ".join(lines))


def modules() -> list[Path]:
    out = [p for p in SRC.rglob("*") if p.suffix in (".py", ".c", ".h") and p.name != "__init__.py"]
    return sorted(out, key=lambda p: (len(p.relative_to(SRC).parts) > 1, str(p.relative_to(SRC))))


def main() -> int:
    print("| module | what it is |\n| --- | --- |")
    for p in modules():
        desc = describe(p).replace("|", "\\|")
        print(f"| `{p.relative_to(SRC)}` | {desc} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
