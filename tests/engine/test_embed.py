"""Chunked embeddings (the server's, interleaved with decode steps) equal the embedding of
one full forward pass, whatever the chunk size."""

from __future__ import annotations

import pytest
import torch

from folklm.engine.embed import ChunkedEmbedding, embed


@pytest.mark.parametrize("n, chunk", [(5, 128), (130, 128), (37, 7), (9, 1)])
def test_chunked_embedding_equals_one_pass(tiny_models, n, chunk):
    import folklm

    _, folder = tiny_models("llama")
    model = folklm.load(folder, dtype="float32").model
    ids = [(3 + 11 * k) % model.config.vocab_size for k in range(n)]
    state = ChunkedEmbedding(model, ids, chunk)
    steps, vector = 0, None
    while vector is None:
        vector = state.step()
        steps += 1
    assert steps == -(-n // chunk)
    torch.testing.assert_close(vector, embed(model, ids), atol=2e-6, rtol=1e-5)
