"""Fixtures for the hub tests: a fresh FOLK_HOME per test."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty FOLK_HOME for this test (in-process API calls and CLI subprocesses)."""
    path = tmp_path / "folk-home"
    monkeypatch.setenv("FOLK_HOME", str(path))
    return path
