"""Helpers for the hub tests: the ``folk`` CLI as a subprocess, model folders with distinct
weights, and a snapshot of everything a FOLK_HOME holds."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import torch
from clitest import assert_one_line_error, folk  # noqa: F401 (re-exported)
from safetensors.torch import save_file

SESSION_HOME = os.environ["FOLK_HOME"]  # set by tests/conftest.py; the default model lives here

# ``folk import`` through a bare 'folklm' package: the hub's import path never needs torch
# (folklm/__init__ loads it), so a process starts in ~0.1 s. Prints "go" just before importing.
IMPORTER = """
import importlib.util, sys, types
spec = importlib.util.find_spec("folklm")
pkg = types.ModuleType("folklm")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["folklm"] = pkg
from folklm.hub.api import import_path
print("go", flush=True)
import_path(sys.argv[1], sys.argv[2])
assert "torch" not in sys.modules
print("done", flush=True)
"""


def folk_parallel(*commands: tuple[str, ...], env: dict | None = None) -> list:
    """Run several independent ``folk`` commands at once (each pays torch's import time)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "folklm.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        for args in commands
    ]
    done = []
    for args, p in zip(commands, procs, strict=True):
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess([*args], p.returncode, out, err))
    return done


def variant(base: Path, dest: Path, seed: int) -> Path:
    """A copy of model folder ``base`` with new random weights (same shapes): new blobs for
    the weights, the same blobs for config and tokenizer files."""
    from safetensors import safe_open

    shutil.copytree(base, dest)
    weights = dest / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    g = torch.Generator().manual_seed(seed)
    weights.unlink()  # copytree kept the original's mode; write a fresh file
    save_file(
        {k: torch.randn(s, generator=g) for k, s in shapes.items()},
        str(weights),
        metadata={"format": "pt"},
    )
    return dest


def snapshot(home: Path) -> tuple:
    """Everything the hub holds: file names and sizes, and the catalogue's content."""
    files = (
        sorted(
            (str(p.relative_to(home)), p.lstat().st_size)
            for p in home.rglob("*")
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))
        )
        if home.exists()
        else []
    )
    db = home / "hub" / "catalogue.sqlite"
    dump: list[str] = []
    if db.exists():
        conn = sqlite3.connect(db)
        dump = list(conn.iterdump())
        conn.close()
    return [f for f in files if not f[0].endswith("catalogue.sqlite")], dump
