"""Docs and code name the test that guards a behaviour (docs/RELIABILITY.md's table, the library
internals in docs/ARCHITECTURE.md, notes in the code): each name must be a test that exists, or
the guard it promises is not there."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMED = re.compile(r"tests/(test_\w+)\.py::(\w+)")
WHERE = ["README.md", "docs", "benchmarks", "captune", "data", "infra", "search", "serving", "trainables"]


def defined_tests(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_test_named_in_docs_and_code_exists():
    missing = []
    for place in WHERE:
        path = ROOT / place
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in (".py", ".md")]
        for f in files:
            for line_no, line in enumerate(f.read_text().splitlines(), 1):
                for module, name in NAMED.findall(line):
                    test_file = ROOT / "tests" / f"{module}.py"
                    if not test_file.exists() or name not in defined_tests(test_file):
                        missing.append(f"{f.relative_to(ROOT)}:{line_no}: tests/{module}.py::{name}")
    assert not missing, "named tests that do not exist:\n" + "\n".join(missing)
