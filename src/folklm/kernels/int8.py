"""int8 weight-only quantization, symmetric, one scale per output channel.

Row ``n`` of the weight is stored as int8 codes ``q[n, k]`` in [-127, 127] and one scale
``s[n] = max_k |W[n, k]| / 127``; the layer computes ``y = (x @ q.T) * s``. This is the
"absmax" vector-wise quantization of LLM.int8() (Dettmers et al., 2022, arXiv:2208.07339)
without its mixed-precision outlier decomposition, and gpt-fast's ``WeightOnlyInt8Linear``.
-128 is unused so that the grid is symmetric around zero.

Error: each weight is off by at most half a step, ``s[n] / 2``. For Gaussian weights with
K inputs, ``max |W|`` is about ``sqrt(2 ln K)`` standard deviations, so the relative RMS
weight error is about ``sqrt(2 ln K) / 127 / sqrt(12)``: 0.85 % at K = 1024.

Kernel: ``torch.ops.aten._weight_int8pack_mm(x, q, s)`` (x: float32/bfloat16/float16,
(M, K); q: int8 (N, K), plain row-major; s: (N,) in x's dtype). In torch 2.13 on AVX-512 its
bfloat16 path returns garbage or crashes when K is not a multiple of 16, so it is only used
for K % 32 == 0 (every real model's hidden sizes) and after a once-per-process self-test.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from folklm.kernels.base import KERNEL_DTYPES, QuantizedLinear, compute_dtype, scale_dtype

QMAX = 127


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (N, K) int8 and scales (N,) in ``dtype`` for a weight (N, K).

    The scale is rounded to ``dtype`` first and the codes are computed against the rounded
    scale, so that ``q * s`` is exactly the grid the layer uses.
    """
    w = w.detach().float()
    amax = w.abs().amax(dim=1)  # (N,)
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).to(dtype)
    q = torch.round(w / scales.float()[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scales


@functools.cache
def kernel_works() -> bool:
    """Whether ``_weight_int8pack_mm`` exists here and matches a float64 reference."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-QMAX, QMAX + 1, (48, 64), dtype=torch.int8, generator=g)
    s = torch.rand(48, generator=g) + 0.5
    x = torch.randn(3, 64, generator=g)
    try:
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            y = op(x.to(dtype), q, s.to(dtype)).double()
            ref = (x.to(dtype).double() @ q.double().T) * s.to(dtype).double()
            if not torch.allclose(y, ref, rtol=tol, atol=tol * ref.abs().max().item()):
                return False
    except RuntimeError:
        return False
    return True


class Int8Linear(QuantizedLinear):
    """A frozen linear layer with int8 per-channel weights (see the module docstring)."""

    scheme = "int8"
    kernel_max_rows = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 2}
    # buffers (registered in __init__)
    qweight: torch.Tensor  # (out_features, in_features) int8
    scales: torch.Tensor  # (out_features,)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = scale_dtype(dtype)
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self._init_bias(bias, dtype, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> Int8Linear:
        """Quantize ``linear``; scales are stored in ``dtype`` (default: the weight's)."""
        w = linear.weight
        dtype = scale_dtype(dtype or w.dtype)
        layer = cls(w.shape[1], w.shape[0], bias=False, dtype=dtype, device="meta")
        layer.qweight, layer.scales = quantize_int8(w, dtype)
        layer._init_bias(linear.bias, dtype)
        return layer

    @property
    def has_kernel(self) -> bool:
        return self.in_features % 32 == 0 and kernel_works()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        ct = compute_dtype(dtype)
        return (self.qweight.to(ct) * self.scales.to(ct)[:, None]).to(dtype)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"Int8Linear: no kernel for {x.dtype} activations")
        s = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, s)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        # |q| <= 127 is exact in every float dtype: no rounding before the matmul
        y = F.linear(x, self.qweight.to(x.dtype))
        return y * self.scales.to(x.dtype)
