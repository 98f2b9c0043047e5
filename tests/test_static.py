"""Static checks CI runs with the suite: ruff's lint and format, and mypy on src/folklm.

They run as tests so that the README's one test command is the whole of CI. Each names
the tool's own output on failure.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "bench", "scripts"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(check):
    ruff = shutil.which("ruff")
    assert ruff, "ruff is a declared test dependency (pip install -e '.[test]')"
    out = _run(ruff, *check, *[p for p in PATHS if (ROOT / p).exists()])
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_on_src():
    out = _run(sys.executable, "-m", "mypy", "--no-error-summary")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
