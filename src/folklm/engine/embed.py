"""Text embeddings from a decoder: the mean of the final hidden states, L2-normalised.

Mean pooling over the last layer's (normed) hidden states is the baseline sentence
embedding of Sentence-BERT (Reimers & Gurevych, 2019, arXiv:1908.10084); a causal
decoder is not trained for it, so these vectors serve retrieval demos and API
compatibility, not state-of-the-art similarity.

:class:`ChunkedEmbedding` computes the same vector a chunk of tokens at a time (a KV cache
carries the context from chunk to chunk, as a chunked prefill does), so the server can
interleave a long input with its decode steps.
"""

from __future__ import annotations

import torch

from folklm.cache import KVCache
from folklm.models.llama import CausalLM


@torch.inference_mode()
def embed(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """(hidden_size,) float32 unit vector for one token sequence."""
    h = model.hidden_states(torch.tensor([ids], dtype=torch.long))[0].float().mean(dim=0)  # (C,)
    return h / h.norm().clamp_min(1e-12)


class ChunkedEmbedding:
    """``embed(model, ids)`` in steps of at most ``chunk`` tokens: call :meth:`step` until
    it returns the vector."""

    def __init__(self, model: CausalLM, ids: list[int], chunk: int = 128):
        self.model, self.ids, self.chunk = model, ids, chunk
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(model.config, 1, len(ids), dtype)
        self.total: torch.Tensor | None = None  # (C,) sum of the hidden states so far
        self.done = 0

    @torch.inference_mode()
    def step(self) -> torch.Tensor | None:
        """Feed the next chunk; the unit vector once every token is in, else None."""
        part = self.ids[self.done : self.done + self.chunk]
        h = self.model.hidden_states(torch.tensor([part], dtype=torch.long), self.cache)
        s = h[0].float().sum(dim=0)  # (C,)
        self.total = s if self.total is None else self.total + s
        self.done += len(part)
        if self.done < len(self.ids):
            return None
        mean = self.total / len(self.ids)
        return mean / mean.norm().clamp_min(1e-12)
