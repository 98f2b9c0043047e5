"""Encoding float weights as GGML Q8_0 and Q4_0 blocks, vectorized in torch.

The algorithms are llama.cpp's reference quantizers (``quantize_row_q8_0_ref`` and
``quantize_row_q4_0_ref`` in ``ggml/src/ggml-quants.c``), so the bytes equal what
``llama-quantize`` (and the ``gguf`` package's ``quants.quantize``) would write for the
same float32 input; the block layouts are described in :mod:`folklm.checkpoint.gguf_quants`.

- Q8_0: ``d = max|x| / 127``, ``q = round(x / d)`` (half away from zero), ``d`` stored as f16.
- Q4_0: ``m`` = the value of largest magnitude (with its sign), ``d = m / -8``,
  ``q = min(15, trunc(x / d + 8.5))``; weight ``j`` is the low nibble of byte ``j`` and weight
  ``j + 16`` the high one.

``int8_as_q8_0`` re-encodes folklm's per-channel int8 codes without a second rounding: each
block keeps its codes and takes its row's scale (rounded to f16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType

BLOCK = 32


@dataclass
class Encoded:
    """A tensor already encoded as GGML blocks: uint8 ``data`` of shape (rows, row bytes)."""

    data: np.ndarray
    qtype: GGMLQuantizationType


def _blocks(w: torch.Tensor) -> torch.Tensor:
    if w.dim() < 1 or w.shape[-1] % BLOCK:
        raise ValueError(f"rows of {w.shape[-1]} weights are not whole {BLOCK}-weight blocks")
    return w.detach().to(torch.float32).reshape(-1, BLOCK)  # (n_blocks, 32)


def _pack(d: torch.Tensor, qs: torch.Tensor, shape: torch.Size) -> np.ndarray:
    """Blocks ``[d:f16 | qs bytes]`` as a uint8 array of shape (rows..., bytes per row)."""
    raw = torch.cat([d.to(torch.float16).view(torch.uint8).reshape(-1, 2), qs], dim=1)
    per_row = shape[-1] // BLOCK * raw.shape[1]
    return raw.reshape(*shape[:-1], per_row).numpy()


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks of ``w`` (last dimension a multiple of 32) as raw bytes."""
    x = _blocks(w)
    d = x.abs().amax(dim=1, keepdim=True) / 127  # (n, 1)
    v = x * _inverse(d)
    a = v.abs()
    whole = torch.floor(a)
    # C roundf (halves away from zero), without the float error of floor(a + 0.5)
    q = torch.sign(v) * (whole + torch.floor(2 * (a - whole)))
    return _pack(d, q.to(torch.int8).view(torch.uint8), w.shape)


def quantize_q4_0(w: torch.Tensor) -> np.ndarray:
    """Q4_0 blocks of ``w`` (last dimension a multiple of 32) as raw bytes."""
    x = _blocks(w)
    at = x.abs().argmax(dim=1, keepdim=True)  # first index of the largest magnitude
    d = torch.gather(x, 1, at) / -8  # (n, 1)
    q = torch.trunc(x * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)  # (n, 32)
    qs = q[:, :16] | (q[:, 16:] << 4)  # (n, 16)
    return _pack(d, qs, w.shape)


def int8_as_q8_0(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Q8_0 bytes for per-row int8 ``codes`` (rows, cols) with one ``scale`` per row."""
    if codes.dim() != 2 or codes.shape[1] % BLOCK:
        raise ValueError(f"int8 codes of shape {tuple(codes.shape)} are not whole Q8_0 blocks")
    n_blocks = codes.shape[1] // BLOCK
    d = scales.detach().float().reshape(-1, 1).expand(-1, n_blocks).reshape(-1, 1)
    qs = codes.detach().to(torch.int8).contiguous().view(torch.uint8).reshape(-1, BLOCK)
    return _pack(d, qs, codes.shape)
