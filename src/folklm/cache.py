"""Static key/value cache, passed into ``forward()`` from outside the model.

One pre-allocated buffer per layer, shaped (B, n_kv_heads, max_len, head_dim), as in
gpt-fast: no re-allocation while decoding, so a decode step does the same work every time.
All rows share one write position; batched prompts of different lengths are left-padded
and the padding is excluded through ``pad_mask``.
"""

from __future__ import annotations

import torch

from folklm.config import ModelConfig
from folklm.errors import FolkError


class KVCache:
    """Per-layer key/value buffers plus the number of filled slots."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.max_len = max_len
        self.length = 0  # filled slots, same for every row
        # (B, max_len) bool, False on padding slots; None when no row is padded.
        self.pad_mask: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, n_kv, T, D) at the current position; return the filled views."""
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
        self.pad_mask = None
