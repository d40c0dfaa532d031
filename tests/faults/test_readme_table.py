"""The README's fault table names the tests of this folder, and every test here is in it."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

HERE = Path(__file__).parent
README = HERE.parent.parent / "README.md"


def table_references() -> list[tuple[str, str]]:
    """(file, test name pattern) of every row of the README's fault table."""
    text = README.read_text()
    section = text.split("### Faults: what each does to a run", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| fault")]
    refs = []
    for row in rows:
        for file, name in re.findall(r"`(test_\w+\.py)(?:::(\w+\*?))?`", row.rsplit("|", 2)[-2]):
            if not file.startswith("test_trainer_"):
                refs.append((file, name or "test_*"))
    return refs


def functions_of(file: str) -> list[str]:
    tree = ast.parse((HERE / file).read_text())
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]


def test_the_fault_table_and_the_fault_tests_match():
    refs = table_references()
    assert len(refs) >= 8
    named = set()
    for file, pattern in refs:
        matches = fnmatch.filter(functions_of(file), pattern)
        assert matches, f"README's fault table names {file}::{pattern}, which matches no test"
        named.update((file, m) for m in matches)
    here = {(p.name, t) for p in HERE.glob("test_*.py") if p.name != Path(__file__).name for t in functions_of(p.name)}
    assert here - named == set(), f"tests of tests/faults missing from README's fault table: {sorted(here - named)}"
