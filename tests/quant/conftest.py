"""Fixtures for quantization tests: a fresh random seed per test, the real model and data."""

from __future__ import annotations

import pytest

from folklm import datasets


@pytest.fixture(scope="session")
def wikitext() -> str:
    return datasets.read_text("wikitext2_raw_test/wiki.test.raw")


@pytest.fixture(scope="session")
def load_default(default_llm):
    """``load_default(dtype)``: a fresh, unpacked copy of the bundled model to quantize
    (``default_llm`` converts it into this session's FOLK_HOME first)."""
    import folklm

    return lambda dtype="bfloat16": folklm.load(dtype=dtype, fast=False)
