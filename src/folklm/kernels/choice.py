"""Which dtype PyTorch's weight-only int8/int4 CPU kernels run in, chosen per CPU.

``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` (torch 2.13) are fast with
bfloat16 activations and slow with float32 ones on every x86-64 CPU measured, AVX2 and
AVX-512 alike: their float32 paths are barely vectorised, while bf16 -> fp32 widening is a
16-bit shift even on AVX2. Measured on one 2048x5632 weight (README, "Quantized kernels"),
the fp32-activation kernels are several times slower than a dense fp32 matmul, and the
bf16-activation ones faster than it, on the AVX2 EPYC and under AVX2 emulation alike.
So float32 activations are rounded to bfloat16 for the kernel and its result widened
back: the products are exact, the sum is accumulated in fp32, and the output is rounded
once to bf16 (relative error <= 2^-9, as in any bf16 model). A dequantized fp32 copy of
the weight is never cached: it would cost 4x the int8 memory.

Elsewhere (ARM, unknown machines) the kernel runs in the activations' own dtype.
"""

from __future__ import annotations

import torch

from folklm.kernels.cpu import cpu_info


def kernel_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype to call the weight-only int8/int4 kernels with, for ``x_dtype``."""
    if x_dtype == torch.float32 and cpu_info().machine in ("x86_64", "AMD64"):
        return torch.bfloat16
    return x_dtype
