"""Fixtures for quantization tests: a fresh random seed per test, the real model and data."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session")
def wikitext() -> str:
    return (DATA / "wikitext2_raw_test" / "wiki.test.raw").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def load_default(default_llm):
    """``load_default(dtype)``: a fresh, unpacked copy of the bundled model to quantize
    (``default_llm`` converts it into this session's FOLK_HOME first)."""
    import folklm

    return lambda dtype="bfloat16": folklm.load(dtype=dtype, fast=False)
