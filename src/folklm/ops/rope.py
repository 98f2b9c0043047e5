"""Rotary position embeddings (RoPE) and the context-extension schemes Llama models use.

RoFormer (Su et al., 2021, arXiv:2104.09864) rotates pairs of query/key channels by an angle
proportional to the position. folklm uses the Hugging Face "rotate half" channel layout
(first half paired with second half), which is how HF checkpoints store q/k weights; GGUF
files use the interleaved layout and are un-permuted at load time.

Scaling schemes (``rope_scaling`` in config.json):
- ``linear``: positions divided by ``factor`` (Chen et al., 2023, arXiv:2306.15595).
- ``llama3``: Llama 3.1's frequency-dependent scaling: low frequencies divided by ``factor``,
  high frequencies kept, a smooth ramp between ``low_freq_factor`` and ``high_freq_factor``.
- ``yarn`` (Peng et al., 2023, arXiv:2309.00071): interpolated low frequencies, extrapolated
  high ones, a linear ramp between the ``beta_fast``/``beta_slow`` rotation counts, and
  cos/sin multiplied by ``0.1 ln(factor) + 1`` (``attention_factor``).
- ``longrope`` / ``su`` (Phi-3; Ding et al., 2024, arXiv:2402.13753): per-frequency divisors,
  ``short_factor`` while the sequence fits ``original_max_position_embeddings`` and
  ``long_factor`` beyond; cos/sin multiplied by ``sqrt(1 + ln(s) / ln(original))``.
- ``dynamic`` (dynamic NTK): the base grows with the sequence once it passes
  ``max_position_embeddings``.

Like transformers, ``longrope`` and ``dynamic`` pick their frequencies from the longest
position of each forward call, so one call's keys may have been rotated with the other set.
"""

from __future__ import annotations

import math

import torch

from folklm.config import ModelConfig
from folklm.errors import ConfigError


def inv_frequencies(
    config: ModelConfig,
    dim: int | None = None,
    *,
    local: bool = False,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/d)`` after the config's scaling, in float64 -> float32.

    ``local``: those of Gemma 3's sliding-window layers (base ``rope_local_base_freq``,
    never scaled). ``seq_len``: the sequence length the ``longrope`` and ``dynamic``
    schemes adapt to (None: their frequencies for a short sequence).
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
    elif rope_type == "yarn":
        inv_freq = _yarn_scale(config, inv_freq, scaling, theta, dim)
    elif rope_type in ("longrope", "su"):
        long = seq_len is not None and seq_len > _original_context(config, scaling)
        factors = _field(scaling, "long_factor" if long else "short_factor", rope_type)
        if len(factors) != len(inv_freq):
            raise ConfigError(
                f"rope_scaling {'long' if long else 'short'}_factor has {len(factors)} "
                f"entries, expected {len(inv_freq)} (head_dim / 2)"
            )
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float64, device="cpu")
    elif rope_type == "dynamic":
        if seq_len is not None and seq_len > config.max_position_embeddings:
            factor = float(_field(scaling, "factor", rope_type))
            ratio = factor * seq_len / config.max_position_embeddings - (factor - 1)
            base = theta * ratio ** (dim / (dim - 2))
            inv_freq = 1.0 / (base ** (steps / dim))
    else:
        raise ConfigError(
            f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3, "
            "yarn, longrope, dynamic"
        )
    return inv_freq.to(torch.float32)


def attention_scaling(config: ModelConfig) -> float:
    """The factor cos and sin are multiplied by (``yarn``, ``longrope``; 1 otherwise)."""
    scaling = config.rope_scaling or {}
    rope_type = config.rope_type
    if scaling.get("attention_factor") is not None and rope_type in ("yarn", "longrope", "su"):
        return float(scaling["attention_factor"])
    if rope_type == "yarn":
        factor = float(_field(scaling, "factor", rope_type))
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all:
            return _mscale(factor, float(mscale)) / _mscale(factor, float(mscale_all))
        return _mscale(factor)
    if rope_type in ("longrope", "su"):
        original = _original_context(config, scaling)
        factor = scaling.get("factor") or config.max_position_embeddings / original
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0


def uses_sequence_length(config: ModelConfig) -> bool:
    """Whether the frequencies depend on the sequence length (``longrope``, ``dynamic``)."""
    return config.rope_type in ("longrope", "su", "dynamic")


def _field(scaling: dict, key: str, rope_type: str):
    if scaling.get(key) is None:
        raise ConfigError(f"rope_scaling type {rope_type} is missing field {key!r}")
    return scaling[key]


def _original_context(config: ModelConfig, scaling: dict) -> int:
    original = scaling.get("original_max_position_embeddings") or config.extra.get(
        "original_max_position_embeddings"
    )
    if not original:
        raise ConfigError(
            f"rope_scaling type {config.rope_type} needs original_max_position_embeddings"
        )
    return int(original)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_scale(
    config: ModelConfig, inv_freq: torch.Tensor, scaling: dict, theta: float, dim: int
) -> torch.Tensor:
    """YaRN's blend of interpolated and extrapolated frequencies (transformers' formula)."""
    original = _original_context(config, scaling)
    factor = float(scaling.get("factor") or config.max_position_embeddings / original)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    extrapolation = 1 - ramp
    return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation


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
        self.config = config
        self.register_buffer("inv_freq", inv_frequencies(config), persistent=False)
        if config.rope_local_base_freq is not None:
            local = inv_frequencies(config, local=True)
            self.register_buffer("local_inv_freq", local, persistent=False)
        self.scaling = attention_scaling(config)
        self.by_length = uses_sequence_length(config)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, local: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> cos, sin: (B, 1, T, head_dim)
        inv_freq = self.local_inv_freq if local else self.inv_freq
        if self.by_length and not local:
            seq_len = int(position_ids.max()) + 1
            inv_freq = inv_frequencies(self.config, seq_len=seq_len).to(inv_freq.device)
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, n_heads, T, head_dim) in the rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
