"""Text embeddings from a decoder: the mean of the final hidden states, L2-normalised.

Mean pooling over the last layer's (normed) hidden states is the baseline sentence
embedding of Sentence-BERT (Reimers & Gurevych, 2019, arXiv:1908.10084); a causal
decoder is not trained for it, so these vectors serve retrieval demos and API
compatibility, not state-of-the-art similarity.
"""

from __future__ import annotations

import torch

from folklm.models.llama import CausalLM


@torch.inference_mode()
def embed(model: CausalLM, ids: list[int]) -> torch.Tensor:
    """(hidden_size,) float32 unit vector for one token sequence."""
    h = model.hidden_states(torch.tensor([ids], dtype=torch.long))[0].float().mean(dim=0)  # (C,)
    return h / h.norm().clamp_min(1e-12)
