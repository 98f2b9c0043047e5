"""Fixtures for the merge tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from mergetest import make_model


@pytest.fixture(scope="session")
def tiny_trio(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("merge-models")
    return [make_model(root / f"m{i}", 100 + i) for i in range(3)]
