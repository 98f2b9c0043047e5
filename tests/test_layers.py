"""The import layers of ``folklm`` (docs/ARCHITECTURE.md): an import only points down.

The map below is the contract. Every import counts, function-local ones included; a
function-local import is allowed only with a comment saying why (start-up time). The same
contract is written for import-linter in ``pyproject.toml`` and checked with ``lint-imports``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from layercheck import cycles, imports, layer_of, modules, upward

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = {
    # 0: maths and data structures, no I/O beyond what a module is about
    "errors": 0,
    "config": 0,
    "ops": 0,
    "models": 0,
    "cache": 0,
    "tokenizer": 0,
    "kernels": 0,
    "version": 0,
    "datasets": 0,  # the shipped data files and their reader (no folklm imports)
    # 1: file formats
    "checkpoint": 1,
    # 2: load a path into a model, decode
    "engine": 2,
    # 3: the store, names and the one resolver (runs no model)
    "hub": 3,
    # 4: operations that make or measure a model
    "quant": 4,
    "tune": 4,
    "merge": 4,
    "eval": 4,
    "export": 4,
    # 5: front doors
    "serve": 5,
    "cli": 5,
}
ROOT_LAYER = 5  # folklm/__init__.py: the public API (folklm.load resolves, then loads)


@pytest.fixture(scope="module")
def found():
    return imports(SRC, "folklm")


def test_every_module_has_a_layer():
    for module in modules(SRC, "folklm"):
        layer_of(module, "folklm", LAYERS, ROOT_LAYER)  # KeyError names a new subpackage


def test_no_import_points_up(found):
    assert upward(found, "folklm", LAYERS, ROOT_LAYER) == []


def test_no_import_cycles(found):
    assert cycles(found, "folklm") == []


def test_function_local_imports_say_why(found):
    silent = [f"{i.module}:{i.line} -> {i.target}" for i in found if i.local and not i.commented]
    assert silent == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_checker_catches_a_planted_upward_import_and_cycle(tmp_path):
    src = _plant(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low/__init__.py": "",
            "pkg/low/a.py": """
                def f():
                    from pkg.high import b
                    import json

                    return b, json


                def g():
                    import os  # why: a planted, commented local import

                    return os
            """,
            "pkg/high/__init__.py": "",
            "pkg/high/b.py": "from ..low import a\nfrom pkg.high import c\n",
            "pkg/high/c.py": "import pkg.high.b  # why: a planted cycle\n",
        },
    )
    found = imports(src, "pkg")
    layers = {"low": 0, "high": 1}
    up = ["pkg.low.a (layer 0) -> pkg.high.b (layer 1), line 3"]
    assert upward(found, "pkg", layers, 2) == up
    assert cycles(found, "pkg") == [["pkg.high.b", "pkg.high.c", "pkg.low.a"]]
    silent = [(i.module, i.target) for i in found if i.local and not i.commented]
    assert silent == [("pkg.low.a", "pkg.high.b"), ("pkg.low.a", "json")]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_import_linter_contract():
    root = SRC.parent
    proc = subprocess.run(
        ["lint-imports", "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout
