"""NF4Linear: the NormalFloat levels, nearest-level codes, double quantization, error."""

from __future__ import annotations

import pytest
import torch
from quanttest import gaussian_linear, rel_err, uniform_noise_estimate

from folklm.kernels.nf4 import BLOCK_SIZE, DQ_BLOCK_SIZE, nf4_levels
from folklm.quant import NF4Linear


def test_levels_are_normal_quantiles():
    """QLoRA's construction: 8 positive and 7 negative N(0,1) quantiles (offset 0.9677083),
    and 0, divided by the largest (bitsandbytes ``create_normal_map``)."""
    offset = 0.9677083
    ppf = torch.special.ndtri
    pos = ppf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ppf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    levels = levels / levels.abs().max()
    torch.testing.assert_close(nf4_levels().double(), levels, rtol=0, atol=1e-6)
    assert nf4_levels()[7] == 0 and nf4_levels()[0] == -1 and nf4_levels()[15] == 1


@pytest.mark.parametrize("double_quant", [False, True])
def test_codes_are_nearest_levels(seed, double_quant):
    lin = gaussian_linear(48, 200)  # 9600 weights: 150 blocks, none padded
    layer = NF4Linear.from_linear(lin, double_quant=double_quant)
    absmax = layer._absmax().double()
    codes = layer.codes().long()
    levels = nf4_levels().double()
    deq = levels[codes] * absmax[:, None]
    assert torch.equal(layer.dequantize(torch.float64).reshape(-1, BLOCK_SIZE), deq), seed
    # exact grid check: no level is nearer than the chosen one (ties either way)
    w = lin.weight.double().reshape(-1, BLOCK_SIZE) / absmax[:, None]
    chosen = (w - levels[codes]).abs()
    best = (w[..., None] - levels).abs().amin(-1)
    assert bool((chosen <= best + 1e-6).all()), f"seed={seed}"
    if not double_quant:  # each block's largest |w| is exactly +-1 * absmax
        assert torch.equal(w.abs().amax(1), torch.ones_like(absmax))
    # per element: at most half the gap between the two levels around it (+ a clamp of the
    # largest weights by the double-quantization error of their constant)
    gaps = levels[1:] - levels[:-1]
    interval = torch.bucketize(w.clamp(-1, 1), levels[1:-1])
    err = (lin.weight.double().reshape(-1, BLOCK_SIZE) - deq).abs()
    bound = gaps[interval] / 2 * absmax[:, None]
    if double_quant:
        bound = bound + layer.absmax_scale.double().max() / 2
    assert bool((err <= bound * (1 + 1e-6)).all()), f"seed={seed}"


def test_double_quantization_of_the_constants(seed):
    lin = gaussian_linear(256, 512)  # 2048 blocks -> 8 second-level blocks of 256
    plain = NF4Linear.from_linear(lin, double_quant=False)
    dq = NF4Linear.from_linear(lin, double_quant=True)
    assert dq.absmax_q.dtype == torch.int8 and dq.absmax_scale.shape == (2048 // DQ_BLOCK_SIZE,)
    err = (dq._absmax() - plain.absmax).abs().reshape(-1, DQ_BLOCK_SIZE)
    assert bool((err <= dq.absmax_scale[:, None] / 2 * (1 + 1e-5)).all()), f"seed={seed}"
    bits = sum(b.numel() * b.element_size() * 8 for b in dq.buffers()) / lin.weight.numel()
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / lin.weight.numel())


def test_error_against_float64_matches_the_derived_bound(seed):
    lin = gaussian_linear(256, 1024, bias=True)
    layer = NF4Linear.from_linear(lin)
    x = torch.randn(64, 1024)
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    rel = rel_err(layer(x), ref)
    # local step = gap between the levels around each weight, times its block's constant
    levels = nf4_levels().double()
    absmax = layer._absmax().double()[:, None]
    w = lin.weight.double().reshape(-1, BLOCK_SIZE) / absmax
    steps = (levels[1:] - levels[:-1])[torch.bucketize(w, levels[1:-1])] * absmax
    est = uniform_noise_estimate(steps, lin.weight)
    # Gaussian weights, blocks of 64: about 9.7 % (the equal-count levels leave the tails'
    # wide gaps nearly empty, so the true error is a little below the estimate)
    assert 0.085 < est < 0.11, f"seed={seed}: est={est}"
    assert 0.8 * est < rel < 1.05 * est, f"seed={seed}: rel={rel:.4f} est={est:.4f}"


def test_frozen_and_dequantize_public(seed):
    lin = gaussian_linear(64, 100, bias=True).to(torch.bfloat16)  # 6400 = 100 blocks
    layer = NF4Linear.from_linear(lin)
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.dequantize().dtype == torch.bfloat16 and layer.dequantize().shape == (64, 100)
    x = torch.randn(2, 5, 100).to(torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 5, 64) and y.dtype == torch.bfloat16
    ref = x.double() @ layer.dequantize(torch.float64).T + layer.bias.double()
    assert rel_err(y, ref) < 1e-2, f"seed={seed}"


def test_padding_of_the_last_block(seed):
    lin = gaussian_linear(3, 30)  # 90 weights: one full block and 26 padded
    layer = NF4Linear.from_linear(lin, double_quant=False)
    assert layer.qweight.numel() == 2 * BLOCK_SIZE // 2
    assert rel_err(layer.dequantize(torch.float64), lin.weight) < 0.15, f"seed={seed}"
