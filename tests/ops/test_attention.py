"""Attention without a mask means causal with the queries at the end of the keys, whatever
the number of queries, against a float64 softmax reference with grouped-query heads."""

from __future__ import annotations

import pytest
import torch

from folklm.ops.attention import attention


def reference(q, k, v):
    """float64 attention where query t of T sees the first S - T + t + 1 of S keys."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    S, rep = k.shape[2], H // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / D**0.5  # (B, H, T, S)
    allowed = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]  # (T, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("T,S", [(1, 9), (4, 4), (3, 9)])
def test_maskless_attention_is_causal_aligned_at_the_end(seed, T, S):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, S, 8, generator=g), torch.randn(2, 2, S, 8, generator=g)
    got = attention(q, k, v, None).double()
    torch.testing.assert_close(got, reference(q, k, v), atol=1e-5, rtol=1e-5)
