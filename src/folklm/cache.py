"""The KV cache protocol, and the static cache that generation and evaluation use.

A model's ``forward(input_ids, cache)`` asks the cache, for the T tokens it is fed, where
they sit: their RoPE positions and, per sliding window, which key slots each query may
attend to (``Feed``); then every layer hands its new keys/values to ``update`` and gets the
keys/values to attend over back; at the end the cache ``advance``s. The model guesses
nothing, so a cache may lay its rows out as it likes (mlx-lm's ``models/cache.py`` and
``create_attention_mask(h, cache)`` follow the same idea):

- ``KVCache`` (here): one pre-allocated buffer per layer, as in gpt-fast; all rows share
  one write position, prompts of different lengths are left-padded. Generation and the
  evaluation scorer (whose continuations start from ``fork``ed copies of a context) use it.
- ``engine.slots``: the server's slot cache, a view for the prefill of one slot and one
  for a batched decode step of rows at different lengths.

A mask is boolean, True = attend, shaped (B|1, 1, T, S) over the S keys ``update``
returns; ``None`` means causal attention with the T queries being the last T of the S keys
is enough (``ops.attention.attention`` handles that case without a mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

from folklm.config import ModelConfig
from folklm.errors import FolkError
from folklm.ops.attention import build_mask

Window = int | None
Masks = dict[Window, torch.Tensor | None]


class Feed(NamedTuple):
    """Where the tokens being fed sit: RoPE positions (B, T) and a mask per window."""

    positions: torch.Tensor
    masks: Masks


class Cache(Protocol):
    """What ``CausalLM.forward`` needs from a KV cache."""

    def feed(self, T: int, windows: Sequence[Window]) -> Feed:
        """Positions and masks for the next T tokens of every row."""
        ...

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, n_kv, T, D) of one layer; return the keys/values to attend over
        (B, n_kv, S, D)."""
        ...

    def advance(self, n: int) -> None:
        """The n fed tokens are now part of the cache."""
        ...


def full_feed(
    B: int, T: int, windows: Sequence[Window], device: torch.device | str | None = None
) -> Feed:
    """The ``Feed`` of a forward pass without a cache: positions 0..T-1, causal masks."""
    positions = torch.arange(T, device=device).expand(B, T)
    return Feed(positions, {w: build_mask(0, T, T, None, w) for w in windows})


class KVCache:
    """Per-layer key/value buffers (B, n_kv_heads, max_len, head_dim) and the filled length.

    Args:
        config: the model's config (layers, kv heads, head dim).
        batch_size: rows.
        max_len: slots per row (prompt + generated tokens).
        dtype: buffer dtype (the model's).
        pad: (B,) left-padding slots of each row (their keys are never attended, and
            positions count from the first real token), or None when no row is padded.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        pad: torch.Tensor | None = None,
    ):
        self.config = config
        shape = (batch_size, config.kv_heads, max_len, config.head_size)
        self.k = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.max_len = max_len
        self.length = 0  # filled slots, same for every row
        self.pad: torch.Tensor | None = None
        self.pad_mask: torch.Tensor | None = None  # (B, max_len) bool, False on padding
        if pad is not None and bool(pad.any()):
            self.pad = pad.to(torch.long)
            self.pad_mask = torch.arange(max_len)[None, :] >= self.pad[:, None]

    def feed(self, T: int, windows: Sequence[Window]) -> Feed:
        start = self.length
        slots = torch.arange(start, start + T)[None, :]  # (1, T)
        B = self.k[0].shape[0]
        if self.pad is None:
            positions = slots.expand(B, T)
        else:
            positions = (slots - self.pad[:, None]).clamp(min=0)  # (B, T)
        masks = {w: build_mask(start, T, start + T, self.pad_mask, w) for w in windows}
        return Feed(positions, masks)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise FolkError(f"KV cache full: {end} tokens > capacity {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def fork(self, rows: torch.Tensor, max_len: int) -> KVCache:
        """A new cache whose row r holds a copy of row ``rows[r]``'s filled prefix, with room
        for ``max_len`` slots (the scorer's continuations of a shared context)."""
        k0 = self.k[0]
        pad = self.pad[rows] if self.pad is not None else None
        new = KVCache(self.config, len(rows), max_len, k0.dtype, k0.device, pad)
        n = self.length
        for layer in range(len(self.k)):
            new.k[layer][:, :, :n] = self.k[layer][rows, :, :n]
            new.v[layer][:, :, :n] = self.v[layer][rows, :, :n]
        new.length = n
        return new
