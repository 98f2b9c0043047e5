"""Which dtype PyTorch's weight-only int8/int4 CPU kernels run in, chosen per CPU.

``_weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` (torch 2.13) are fast with
bfloat16 activations and slow with float32 ones on every x86-64 CPU measured, AVX2 and
AVX-512 alike: their float32 paths are barely vectorised, while bf16 -> fp32 widening is a
16-bit shift even on AVX2. One 2048x5632 weight, one activation row, 1 thread, µs
(2026-11-29, Xeon with AMX run as AVX2 via ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``, load average ~5 on 2 cores, so only the ranking is solid):

    dense fp32 (oneDNN)     1,683     int8 kernel, fp32 x   14,425    int8 kernel, bf16 x   759
    dequantize + fp32     59,550     int4 kernel, fp32 x   94,681    int4 kernel, bf16 x   987

(the issue's probe on a real AVX2 EPYC found the fp32 kernels 7-9x slower than dense fp32
too). So float32 activations are rounded to bfloat16 for the kernel and its result widened
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
