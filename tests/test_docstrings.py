"""Docstrings describe the design; measured figures go stale and live in the README."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "folklm"
# a timing, a throughput or a speed-up ratio: "0.94 ms", "42 tok/s", "16 GB/s", "1.5x faster"
MEASURED = re.compile(
    r"\d+(?:\.\d+)?\s?(?:ms|us|µs|tok/s|tokens/s|GB/s|MB/s)\b"
    r"|\d+(?:\.\d+)?\s?[x×] (?:faster|slower)"
)


def measured_figures(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        nodes = [
            tree,
            *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)),
        ]
        for node in nodes:
            doc = ast.get_docstring(node) or ""
            found += [f"{path.name}: {m.group(0)}" for m in MEASURED.finditer(doc)]
    return found


def test_no_benchmark_numbers_in_docstrings():
    assert measured_figures(SRC) == []


def test_the_check_finds_a_planted_figure(tmp_path):
    (tmp_path / "m.py").write_text('"""Fast: 42 tok/s and 0.9 ms per call, 1.5x faster."""\n')
    assert measured_figures(tmp_path) == ["m.py: 42 tok/s", "m.py: 0.9 ms", "m.py: 1.5x faster"]
