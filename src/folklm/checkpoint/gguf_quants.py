"""Dequantization of GGML tensor encodings, vectorized in torch.

A quantized GGML tensor is a sequence of fixed-size blocks along each row; every block encodes
``block_size`` consecutive weights with its own scale (and minimum). The layouts below follow
the ``block_*`` structs in llama.cpp's ``ggml/src/ggml-common.h`` and the reference decoders
``dequantize_row_*`` in ``ggml/src/ggml-quants.c`` (all little-endian, ``QK_K = 256``):

=====  ==========  ===========================================================================
type   bytes/blk   layout (weights per block)
=====  ==========  ===========================================================================
Q8_0   34          d:f16, qs:int8[32]                              w = d * q           (32)
Q4_0   18          d:f16, qs:u8[16] (nibbles)                      w = d * (q - 8)     (32)
Q4_1   20          d:f16, m:f16, qs:u8[16]                         w = d * q + m       (32)
Q5_0   22          d:f16, qh:u32, qs:u8[16]                        w = d * (q - 16)    (32)
Q5_1   24          d:f16, m:f16, qh:u32, qs:u8[16]                 w = d * q + m       (32)
Q4_K   144         d, dmin:f16, scales:u8[12] (8 x 6-bit sc, m),   w = d*sc*q - dmin*m (256)
                   qs:u8[128]
Q5_K   176         d, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]  as Q4_K, 5-bit q (256)
Q6_K   210         ql:u8[128], qh:u8[64], scales:int8[16], d:f16   w = d * sc * (q-32) (256)
=====  ==========  ===========================================================================

In the 32-weight formats weight ``j < 16`` is the low nibble of ``qs[j]`` and weight ``j + 16``
its high nibble; Q5_0/Q5_1 add bit ``j`` of ``qh`` as the fifth bit of weight ``j``. The
K-quants are described next to their decoders. (Q5_0 is not optional in practice: llama.cpp's
K-quant mixes fall back to it for rows whose length is not a multiple of 256.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

QK_K = 256

# (weights per block, bytes per block), as gguf.GGML_QUANT_SIZES, for the types we decode.
BLOCK_SIZES: dict[Q, tuple[int, int]] = {
    Q.F32: (1, 4),
    Q.F16: (1, 2),
    Q.BF16: (1, 2),
    Q.Q8_0: (32, 34),
    Q.Q4_0: (32, 18),
    Q.Q4_1: (32, 20),
    Q.Q5_0: (32, 22),
    Q.Q5_1: (32, 24),
    Q.Q4_K: (QK_K, 144),
    Q.Q5_K: (QK_K, 176),
    Q.Q6_K: (QK_K, 210),
}


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 stored at byte ``offset`` of each block, as float32 of shape (n, 1)."""
    return blocks[:, offset : offset + 2].view(torch.float16).float()


# The decoders below write into ``out`` (n_blocks, block_size) float32. Nibbles are split over
# whole blocks (scale bytes included) because one pass over contiguous bytes is several times
# faster than bit operations on the strided 16-byte ``qs`` slices; the products are computed
# in the same order as ggml's reference decoders, so results match them bit for bit.


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(blocks[:, 2:].view(torch.int8), _f16(blocks, 0), out=out)


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(blocks, 0)
    lo = (blocks & 0x0F).view(torch.int8) - 8
    hi = (blocks >> 4).view(torch.int8) - 8
    torch.mul(lo[:, 2:], d, out=out[:, :16])
    torch.mul(hi[:, 2:], d, out=out[:, 16:])


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    torch.addcmul(m, (blocks & 0x0F)[:, 4:], d, out=out[:, :16])
    torch.addcmul(m, (blocks >> 4)[:, 4:], d, out=out[:, 16:])


# _BITS[v, k] = (bit k of v) << 4: the fifth bits of 8 weights from one byte of ``qh``.
_BITS = (
    ((torch.arange(256, dtype=torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1) << 4
).to(torch.uint8)


def _q5(blocks: torch.Tensor, qh_at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5_0/Q5_1 5-bit values (0..31) of weights 0..15 and 16..31, each (n, 16) uint8."""
    n = blocks.shape[0]
    high = _BITS[blocks[:, qh_at : qh_at + 4].int()].reshape(n, 32)
    qs = qh_at + 4
    return (blocks & 0x0F)[:, qs:] | high[:, :16], (blocks >> 4)[:, qs:] | high[:, 16:]


def _q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    d = _f16(blocks, 0)
    first, second = _q5(blocks, 2)
    torch.mul(first.view(torch.int8) - 16, d, out=out[:, :16])
    torch.mul(second.view(torch.int8) - 16, d, out=out[:, 16:])


def _q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    first, second = _q5(blocks, 4)
    torch.addcmul(m, first, d, out=out[:, :16])
    torch.addcmul(m, second, d, out=out[:, 16:])


def _k_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: per sub-block scale ``d * sc`` and offset ``dmin * m``, each (n, 4, 2, 1).

    The 12 bytes ``s`` after d and dmin hold 8 six-bit scales and mins (``get_scale_min_k4``
    in ggml-quants.c): for sub-block j < 4, sc = s[j] & 63 and m = s[j+4] & 63; for j >= 4 the
    low 4 bits come from s[j+4] (sc low nibble, m high nibble) and the top 2 bits from the
    spare high bits of s[j-4] (sc) and s[j] (m). Sub-block ``j`` is ``[:, j // 2, j % 2]``.
    """
    n = blocks.shape[0]
    s = blocks[:, 4:16].int()
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]  # (n, 4) each
    sc = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=1)  # (n, 8)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)  # (n, 8)
    scale = (_f16(blocks, 0) * sc).reshape(n, 4, 2, 1)
    offset = (_f16(blocks, 2) * m).reshape(n, 4, 2, 1)
    return scale, offset


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # 256 weights = 4 chunks of 64; chunk c uses qs[32c:32c+32]: its low nibbles are
    # sub-block 2c, its high nibbles sub-block 2c+1.
    n = blocks.shape[0]
    scale, offset = _k_scales(blocks)
    o = out.view(n, 4, 2, 32)
    for half, q in enumerate(((blocks & 0x0F)[:, 16:], (blocks >> 4)[:, 16:])):
        torch.addcmul(
            -offset[:, :, half], q.reshape(n, 4, 32), scale[:, :, half], out=o[:, :, half]
        )


def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # As Q4_K, plus a fifth bit: sub-block j takes bit j of qh[l] for its weight l.
    n = blocks.shape[0]
    scale, offset = _k_scales(blocks)
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    high = (((blocks[:, 16:48].reshape(n, 1, 32) >> shifts) & 1) << 4).reshape(n, 4, 2, 32)
    o = out.view(n, 4, 2, 32)
    for half, q in enumerate(((blocks & 0x0F)[:, 48:], (blocks >> 4)[:, 48:])):
        q = q.reshape(n, 4, 32) | high[:, :, half]
        torch.addcmul(-offset[:, :, half], q, scale[:, :, half], out=o[:, :, half])


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # Two halves of 128 weights. Half h uses ql[64h:64h+64] and qh[32h:32h+32]; for l < 32:
    #   w[l]    = ql[l] & 15      | (qh[l] >> 0 & 3) << 4
    #   w[l+32] = ql[l+32] & 15   | (qh[l] >> 2 & 3) << 4
    #   w[l+64] = ql[l] >> 4      | (qh[l] >> 4 & 3) << 4
    #   w[l+96] = ql[l+32] >> 4   | (qh[l] >> 6 & 3) << 4
    # minus 32, and every run of 16 weights has its own int8 scale, in order.
    n = blocks.shape[0]
    lo = (blocks & 0x0F)[:, :128].reshape(n, 2, 2, 32)
    hi = (blocks >> 4)[:, :128].reshape(n, 2, 2, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3) << 4  # (n, 2, 4, 32)
    q = (torch.cat([lo, hi], dim=2) | high).view(torch.int8) - 32
    scale = blocks[:, 192:208].view(torch.int8) * _f16(blocks, 208)  # (n, 16)
    torch.mul(q.reshape(n, 16, 16), scale.unsqueeze(-1), out=out.view(n, 16, 16))


_DECODERS: dict[Q, Callable[[torch.Tensor, torch.Tensor], None]] = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}

# Blocks decoded per step: bounds the temporaries to a few MB per tensor.
_CHUNK_WEIGHTS = 1 << 20


def dequantize(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode one GGML tensor to float32.

    Args:
        data: the tensor's raw bytes as ``gguf.GGUFReader`` gives them (any dtype and shape;
            only the bytes are used).
        qtype: its GGML encoding.
        shape: the element shape in row-major (numpy / Hugging Face) order, i.e. the reversed
            GGML ``ne``; for a linear weight ``(out_features, in_features)``.

    Returns:
        A new (writable, not memory-mapped) float32 tensor of ``shape``.

    Raises:
        ValueError: ``qtype`` is not one folklm decodes, or the byte count does not match.
    """
    qtype = Q(qtype)
    if qtype not in BLOCK_SIZES:
        raise ValueError(f"unsupported GGML type {qtype.name}")
    block_size, type_size = BLOCK_SIZES[qtype]
    n_elements = int(np.prod(shape, dtype=np.int64))
    if n_elements % block_size:
        raise ValueError(f"{n_elements} weights are not a whole number of {qtype.name} blocks")
    n_blocks = n_elements // block_size
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if flat.size != n_blocks * type_size:
        raise ValueError(
            f"{qtype.name} tensor of shape {tuple(shape)} needs {n_blocks * type_size} bytes, "
            f"got {flat.size}"
        )
    # One copy out of the memory map into torch-owned memory; everything after is in torch.
    raw = torch.empty(flat.size, dtype=torch.uint8)
    raw.numpy()[:] = flat
    if qtype == Q.F32:
        return raw.view(torch.float32).reshape(shape)
    if qtype == Q.F16:
        return raw.view(torch.float16).float().reshape(shape)
    if qtype == Q.BF16:
        return raw.view(torch.bfloat16).float().reshape(shape)
    decode = _DECODERS[qtype]
    blocks = raw.view(n_blocks, type_size)
    out = torch.empty(n_blocks, block_size, dtype=torch.float32)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    for start in range(0, n_blocks, step):
        decode(blocks[start : start + step], out[start : start + step])
    return out.reshape(shape)
