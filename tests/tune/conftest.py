"""Fixtures for the fine-tuning tests: a tiny Llama with a real BPE tokenizer and ChatML."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from folklm import datasets

ROOT = Path(__file__).resolve().parents[2]
SHAREGPT = datasets.path("sharegpt_dummy_conversation/dummy_conversation.json")
ALPACA = datasets.path("alpaca_tiny/alpaca_tiny.json")
HH = datasets.path("hh_rlhf_harmless_base_test/harmless-base/test.jsonl.gz")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty FOLK_HOME for this test (in-process calls and CLI subprocesses)."""
    path = tmp_path / "folk-home"
    monkeypatch.setenv("FOLK_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_chat(bpe_models) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with a byte-level BPE + ChatML template."""
    return bpe_models("llama")


def folk(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "folklm.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
