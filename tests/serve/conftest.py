"""Servers for the serve tests: the bundled model (module scope), a tiny BPE model."""

from __future__ import annotations

import pytest
from serverutil import LiveServer  # noqa: E402 - tests/serve is on sys.path (rootdir conftest)

from folklm.serve.app import ServeConfig, build_app

API_KEY = "sk-test-key"


@pytest.fixture(scope="session")
def default_server():
    """``folk serve`` of the bundled SmolLM2-135M-Instruct (its own copy of the model)."""
    import folklm

    llm = folklm.load(dtype="float32")
    config = ServeConfig(models=[llm], names=["smollm2"], max_batch=16, max_queue=64)
    with LiveServer(build_app(config)) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server(bpe_models):
    """A tiny random llama with a real byte-level BPE tokenizer and ChatML: fast to run,
    with an API key and short sequences, for the fuzz and disconnect tests."""
    config = ServeConfig(
        models=[str(bpe_models("llama"))],
        names=["tiny"],
        api_keys=[API_KEY],
        max_batch=64,
        max_queue=128,
        max_len=96,
        max_body_bytes=1 << 20,
    )
    with LiveServer(build_app(config)) as server:
        yield server
