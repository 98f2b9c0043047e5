"""The ``folk`` command as a user runs it (a real subprocess), and its error contract."""

from __future__ import annotations

import os
import subprocess
import sys


def folk(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 300):
    """Run ``folk ARGS`` in a real process with the current environment (FOLK_HOME...)."""
    return subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc, *words: str) -> None:
    """A user mistake: non-zero exit, exactly one ``folk: error:`` line naming ``words``."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("folk: error:"), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
