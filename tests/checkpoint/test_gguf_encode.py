"""Q8_0 / Q4_0 encoders vs the ``gguf`` package's quantizer, byte for byte, on fresh data."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from folklm.checkpoint.gguf_encode import int8_as_q8_0, quantize_q4_0, quantize_q8_0
from folklm.checkpoint.gguf_quants import dequantize


def _weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g) * 4
    w[0, :32] = 0  # an all-zero block: d = 0
    w[1, :32] = torch.linspace(-1, 1, 32)  # ties in magnitude: the first one decides
    w[2, :32] = torch.arange(32) / 127 * 0.5  # values on exact .5 rounding boundaries
    return w


@pytest.mark.parametrize(("qtype", "encode"), [(Q.Q8_0, quantize_q8_0), (Q.Q4_0, quantize_q4_0)])
def test_encoders_match_gguf_bit_for_bit(qtype, encode):
    seed = int(torch.randint(0, 2**31, ()).item())
    w = _weights(seed)
    ours = encode(w)
    ref = gguf.quants.quantize(w.numpy(), qtype)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert np.array_equal(ours, ref), f"seed {seed}"
    # and both decoders agree on the result
    back = dequantize(ours, qtype, tuple(w.shape)).numpy()
    np.testing.assert_array_equal(back, gguf.quants.dequantize(ref, qtype))
    # half a step of the block's scale (a whole one where Q4_0 clamps +8 to +7), plus the
    # f16 rounding of the scale times the largest code
    step, top = (1 / 127, 127) if qtype == Q.Q8_0 else (1 / 8, 8)
    bound = step * ((0.5 if qtype == Q.Q8_0 else 1.0) + top * 2**-11)
    amax = w.reshape(-1, 32).abs().amax(1, keepdim=True)
    err = (torch.from_numpy(back) - w).reshape(-1, 32).abs()
    assert bool((err <= amax * bound + 1e-6).all()), f"seed {seed}"


def test_int8_codes_keep_their_values():
    codes = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
    scales = torch.rand(16) * 0.1
    raw = int8_as_q8_0(codes, scales)
    back = dequantize(raw, Q.Q8_0, (16, 64))
    expected = codes.float() * scales.to(torch.float16).float()[:, None]
    torch.testing.assert_close(back, expected, rtol=0, atol=0)


def test_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match="not whole 32-weight blocks"):
        quantize_q8_0(torch.randn(4, 48))
