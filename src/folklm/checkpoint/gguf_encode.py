"""Encoding float weights as GGML Q8_0, Q4_0 and Q4_1 blocks, vectorized in torch.

The algorithms are llama.cpp's reference quantizers (``quantize_row_q8_0_ref``,
``quantize_row_q4_0_ref`` and ``quantize_row_q4_1_ref`` in ``ggml/src/ggml-quants.c``), so
the bytes equal what
``llama-quantize`` (and the ``gguf`` package's ``quants.quantize``) would write for the
same float32 input; the block layouts are described in :mod:`folklm.checkpoint.gguf_quants`.

- Q8_0: ``d = max|x| / 127``, ``q = round(x / d)`` (half away from zero), ``d`` stored as f16.
- Q4_0: ``m`` = the value of largest magnitude (with its sign), ``d = m / -8``,
  ``q = min(15, trunc(x / d + 8.5))``; weight ``j`` is the low nibble of byte ``j`` and weight
  ``j + 16`` the high one.
- Q4_1: ``d = (max - min) / 15``, ``m = min``, ``q = min(15, trunc((x - min) / d + 0.5))``;
  ``w = d * q + m``, d and m stored as f16; nibbles as in Q4_0.

``int8_as_q8_0`` re-encodes folklm's per-channel int8 codes without a second rounding: each
block keeps its codes and takes its row's scale (rounded to f16). ``int4_as_q4_1`` does the
same for folklm's group-wise int4 (``w = s * (q - 8) + z``, groups of 32, 64, ... inputs):
every 32-weight block of a group keeps its grid and each weight's point on it: ``d = s``
and ``m`` = the block's smallest weight (codes shifted by the block's smallest code), both
rounded to f16 - the only change to a weight is that rounding, at most
``15 * |fp16(s) - s| + |fp16(m) - m|`` <= ``2**-11 * (15 |s| + |m|)`` (f16's normal range).
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


def quantize_q4_1(w: torch.Tensor) -> np.ndarray:
    """Q4_1 blocks of ``w`` (last dimension a multiple of 32) as raw bytes."""
    x = _blocks(w)
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    d = (hi - lo) / 15  # (n, 1)
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)  # (n, 32)
    return _pack_q4_1(d, lo, q, w.shape)


def _pack_q4_1(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, shape) -> np.ndarray:
    """Blocks ``[d:f16 | m:f16 | 16 nibble bytes]`` from (n, 1) d and m and (n, 32) codes."""
    qs = q[:, :16] | (q[:, 16:] << 4)  # (n, 16)
    dm = torch.cat([d.to(torch.float16), m.to(torch.float16)], dim=1)  # (n, 2)
    raw = torch.cat([dm.view(torch.uint8).reshape(-1, 4), qs], dim=1)  # (n, 20)
    return raw.reshape(*shape[:-1], shape[-1] // BLOCK * raw.shape[1]).numpy()


def int4_as_q4_1(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> np.ndarray:
    """Q4_1 bytes for int4 ``codes`` (N, K) in [0, 15] read as ``s * (q - 8) + z``, with
    ``scales`` and ``zeros`` (N, K / group_size); group_size a multiple of 32.

    Each block's codes are shifted down by their smallest one, c, so that ``m`` is the
    block's smallest weight ``z + (c - 8) s`` (f16 rounds it relative to the weights, not
    to ``z - 8 s``, which can be far larger); the grid and each weight's point on it stay.
    """
    N, K = codes.shape
    if group_size % BLOCK or K % group_size or scales.shape != (N, K // group_size):
        raise ValueError(
            f"int4 codes {tuple(codes.shape)} with group size {group_size} and scales "
            f"{tuple(scales.shape)} are not whole Q4_1 blocks"
        )
    per = group_size // BLOCK  # Q4_1 blocks per group
    s = scales.detach().double().repeat_interleave(per, dim=1).reshape(-1, 1)
    z = zeros.detach().double().repeat_interleave(per, dim=1).reshape(-1, 1)
    q = codes.detach().to(torch.uint8).reshape(-1, BLOCK)
    low = q.amin(dim=1, keepdim=True)  # (n, 1)
    return _pack_q4_1(s, z + (low.double() - 8) * s, q - low, codes.shape)


def int8_as_q8_0(codes: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Q8_0 bytes for per-row int8 ``codes`` (rows, cols) with one ``scale`` per row."""
    if codes.dim() != 2 or codes.shape[1] % BLOCK:
        raise ValueError(f"int8 codes of shape {tuple(codes.shape)} are not whole Q8_0 blocks")
    n_blocks = codes.shape[1] // BLOCK
    d = scales.detach().float().reshape(-1, 1).expand(-1, n_blocks).reshape(-1, 1)
    qs = codes.detach().to(torch.int8).contiguous().view(torch.uint8).reshape(-1, BLOCK)
    return _pack(d, qs, codes.shape)
