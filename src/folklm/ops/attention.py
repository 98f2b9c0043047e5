"""Attention masks and scaled dot-product attention over a KV cache.

Keys live in cache *slots*; with left padding every row of a batch writes its tokens to the
same slots, so slot distance equals position distance among real tokens. Masks are built
over slots: causal (a query sees slots up to its own), padding (never attend to a pad
slot) and the sliding window of Mistral (Jiang et al., 2023, arXiv:2310.06825): a query at
slot q sees key slot k only when ``q - k < sliding_window``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def build_mask(
    q_start: int,
    q_len: int,
    kv_len: int,
    pad_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B|1, 1, q_len, kv_len), True = attend; None when plain causal suffices.

    Args:
        q_start: cache slot of the first query token.
        q_len: number of query tokens.
        kv_len: number of key slots attended over (``q_start + q_len``).
        pad_mask: (B, kv_len) bool, False where the slot holds padding.
        sliding_window: Mistral-style window size, or None.
    """
    # the window when it hides some key, else None
    window = sliding_window if sliding_window is not None and kv_len > sliding_window else None
    if pad_mask is None and window is None and (q_len == 1 or q_start == 0):
        return None  # one query sees every cached key, or plain causal over a fresh sequence
    q_slots = torch.arange(q_start, q_start + q_len)[:, None]  # (T, 1)
    k_slots = torch.arange(kv_len)[None, :]  # (1, S)
    mask = k_slots <= q_slots  # (T, S)
    if window is not None:
        mask = mask & (q_slots - k_slots < window)
    mask = mask[None, None]  # (1, 1, T, S)
    if pad_mask is not None:
        mask = mask & pad_mask[:, None, None, :kv_len]
        # A pad query would see no key at all and SDPA would return NaN, which then sits in
        # the cache as a (masked) value and poisons 0 * NaN products: let it see itself.
        mask = mask | (k_slots == q_slots)[None, None]
    return mask


def build_row_masks(
    positions: torch.Tensor, span: int, windows: Iterable[int | None]
) -> dict[int | None, torch.Tensor | None]:
    """{window: (B, 1, 1, span) bool} for one query per row at its own slot: row b sees key
    slots ``<= positions[b]`` (and within the window), whatever the other rows' lengths."""
    k = torch.arange(span)[None, :]  # (1, S)
    q = positions[:, None]  # (B, 1)
    base = k <= q
    masks: dict[int | None, torch.Tensor | None] = {}
    for w in windows:
        m = base if w is None else base & (q - k < w)
        masks[w] = m[:, None, None, :]
    return masks


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """SDPA with grouped-query attention: q (B, H, T, D), k/v (B, H_kv, S, D) -> (B, H, T, D).

    ``mask`` None means causal with the T queries being the last T keys: a single query
    then sees every key, and T == S is SDPA's own ``is_causal``.
    Query head h reads kv head ``h // n_rep`` (the grouping of HF's ``repeat_kv``). For a
    single decode token the n_rep query heads of a group are stacked as n_rep "positions"
    of one head, so no copy of the cache is made to repeat it.

    ``scale`` replaces ``1/sqrt(D)`` (Gemma: ``query_pre_attn_scalar``); ``softcap`` caps the
    scores at ``softcap * tanh(score / softcap)`` before the mask (Gemma 2), which SDPA
    cannot do, so that case runs the explicit softmax.
    """
    if softcap is not None:
        return _capped_attention(q, k, v, mask, scale, softcap)
    B, H, T, D = q.shape
    n_rep = H // k.shape[1]
    if T == 1 and n_rep > 1:
        q = q.reshape(B, k.shape[1], n_rep, D)  # (B, H_kv, n_rep, D)
        if mask is not None:
            mask = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])  # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return y.reshape(B, H, 1, D)
    S = k.shape[2]
    if mask is None and 1 < T < S:  # a chunk after cached keys: causal, aligned at the end
        mask = build_mask(S - T, T, S)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and T > 1,
        enable_gqa=n_rep > 1,
        scale=scale,
    )


def _capped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    softcap: float,
) -> torch.Tensor:
    """Attention with tanh-capped scores, in transformers' eager order (Gemma 2)."""
    B, H, T, D = q.shape
    S, n_rep = k.shape[2], H // k.shape[1]
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else D**-0.5)
    scores = torch.tanh(scores / softcap) * softcap  # (B, H, T, S)
    if mask is None:  # causal, the T queries being the last T keys
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v
