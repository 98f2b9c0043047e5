"""Rotary position embeddings (RoPE) and the context-extension schemes Llama models use.

RoFormer (Su et al., 2021, arXiv:2104.09864) rotates pairs of query/key channels by an angle
proportional to the position. folklm uses the Hugging Face "rotate half" channel layout
(first half paired with second half), which is how HF checkpoints store q/k weights; GGUF
files use the interleaved layout and are un-permuted at load time.

Scaling schemes (``rope_scaling`` in config.json):
- ``linear``: positions divided by ``factor`` (Chen et al., 2023, arXiv:2306.15595).
- ``llama3``: Llama 3.1's frequency-dependent scaling: low frequencies divided by ``factor``,
  high frequencies kept, a smooth ramp between ``low_freq_factor`` and ``high_freq_factor``.
"""

from __future__ import annotations

import math

import torch

from folklm.config import ModelConfig
from folklm.errors import ConfigError


def inv_frequencies(
    config: ModelConfig, dim: int | None = None, *, local: bool = False
) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/d)`` after the config's scaling, in float64 -> float32.

    ``local``: those of Gemma 3's sliding-window layers (base ``rope_local_base_freq``,
    never scaled).
    """
    dim = dim or config.head_size
    steps = torch.arange(0, dim, 2, dtype=torch.float64, device="cpu")  # never on meta
    theta = config.rope_local_base_freq if local else config.rope_theta
    assert theta is not None, "local frequencies need rope_local_base_freq"
    inv_freq = 1.0 / (theta ** (steps / dim))
    rope_type = "default" if local else config.rope_type
    scaling = config.rope_scaling or {}
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    else:
        raise ConfigError(
            f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3"
        )
    return inv_freq.to(torch.float32)


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    try:
        factor = float(scaling["factor"])
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise ConfigError(f"rope_scaling type llama3 is missing field {e.args[0]!r}") from None
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Holds the inverse frequencies; returns (cos, sin) for given positions.

    A config with ``rope_local_base_freq`` (Gemma 3) also gets ``local_inv_freq``, the
    frequencies of its sliding-window layers: ``forward(..., local=True)``.
    """

    inv_freq: torch.Tensor  # buffers (register_buffer)
    local_inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", inv_frequencies(config), persistent=False)
        if config.rope_local_base_freq is not None:
            local = inv_frequencies(config, local=True)
            self.register_buffer("local_inv_freq", local, persistent=False)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, local: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> cos, sin: (B, 1, T, head_dim)
        inv_freq = self.local_inv_freq if local else self.inv_freq
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, n_heads, T, head_dim) in the rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
