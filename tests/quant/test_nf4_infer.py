"""NF4 for inference: converted to int8 at load (int4 on request), close to the NF4 weight."""

from __future__ import annotations

import copy

import torch
from quanttest import gaussian_linear, rel_err

import folklm
from folklm.engine.fast import pack_linears
from folklm.quant import Int4Linear, Int8Linear, NF4Linear, quantize


def _group_sq_err(layer: Int4Linear, w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    return (layer.dequantize(torch.float64) - w).square().reshape(N, K // 32, 32).sum(-1)


def test_to_int4_is_close_to_the_nf4_weight(seed):
    lin = gaussian_linear(64, 256, bias=True)
    nf4 = NF4Linear.from_linear(lin)
    w_nf4 = nf4.dequantize(torch.float64)
    minmax, fitted = nf4.to_int4(32, fit=False), nf4.to_int4(32)
    assert isinstance(fitted, Int4Linear) and fitted.group_size == 32
    # min/max grid: within half a step (plus the bf16 rounding of scale and zero)
    step = minmax.scales.double().repeat_interleave(32, dim=1)
    slack = 4e-3 * w_nf4.abs().amax()
    assert bool(((minmax.dequantize(torch.float64) - w_nf4).abs() <= step / 2 + slack).all())
    # the least-squares grid is never worse, group by group
    assert bool((_group_sq_err(fitted, w_nf4) <= _group_sq_err(minmax, w_nf4) + 1e-12).all())
    # measured 6.8 % (fitted) and 7.9 % (min/max) on N(0, 0.02^2) weights; NF4 itself: 9.2 %
    assert rel_err(fitted.dequantize(torch.float64), w_nf4) < 0.08, f"seed={seed}"
    assert torch.equal(fitted.bias, nf4.bias)


def test_to_int8_is_within_half_a_step_of_the_nf4_weight(seed):
    lin = gaussian_linear(64, 256, bias=True)
    nf4 = NF4Linear.from_linear(lin)
    w_nf4 = nf4.dequantize(torch.float64)
    q = nf4.to_int8()
    assert isinstance(q, Int8Linear)
    # per output channel: step = max|w| / 127 (bf16 scale), rounding within half a step
    step = w_nf4.abs().amax(dim=1, keepdim=True) / 127
    err = (q.dequantize(torch.float64) - w_nf4).abs()
    assert bool((err <= step * (0.5 + 2**-7) + 1e-12).all()), f"seed={seed}"
    assert torch.equal(q.bias.float(), nf4.bias.float())


def test_width_not_divisible_stays_nf4():
    nf4 = NF4Linear.from_linear(gaussian_linear(16, 48))
    assert nf4.to_int4(32) is nf4


def test_fast_model_has_no_nf4_layer_left(tiny_models):
    _, folder = tiny_models("llama")
    llm = folklm.load(folder, dtype="float32", fast=False)
    quantize(llm, "nf4", progress=False)
    converted = copy.deepcopy(llm.model)
    for module in list(converted.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, NF4Linear):
                setattr(module, name, child.to_int8())
    pack_linears(llm.model)  # what folklm.load(..., fast=True) does
    assert not any(isinstance(m, NF4Linear) for m in llm.model.modules())
    assert any(isinstance(m, Int8Linear) for m in llm.model.modules())
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        # the same int8 weights; the packed kernel may round activations to bf16
        assert rel_err(llm.model(ids), converted(ids)) < 3e-2
