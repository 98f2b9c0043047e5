"""Run-time choices that depend on the CPU at hand: the default dtype, what oneDNN can pack.

The same install runs on an AVX2-only laptop and on an AVX-512/AMX server, so nothing here
assumes a machine: every choice reads ``folklm.kernels.cpu.cpu_info()`` (whose
``FOLK_CPU_FLAGS_MASK`` hides features) and, where PyTorch has its own answer, asks it too
(``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` limit what PyTorch uses).

Default dtype: bfloat16 halves the bytes a decode step reads, and on CPUs with native bf16
arithmetic (AVX-512-BF16, AMX, AVX-NE-CONVERT) it is the faster choice. Elsewhere bf16
matmuls are emulated (each value widened to fp32 in software) and oneDNN cannot pack bf16
weights at all, so float32 is faster there and is the default.
"""

from __future__ import annotations

import functools
import sys

import torch

from folklm.kernels.cpu import cpu_info


def default_dtype(saved: str | None = None) -> str:
    """The compute dtype when the user names none.

    Args:
        saved: the dtype a quantized entry was saved in (its ``quantization_config``), if any.

    Returns ``saved`` (or ``"bfloat16"`` when nothing was saved) where the CPU has native
    bf16; on other CPUs a bf16 choice becomes ``"float32"``.
    """
    want = saved or "bfloat16"
    if want == "bfloat16" and not cpu_info().native_bf16:
        return "float32"
    return want


@functools.cache
def bf16_packing_supported() -> bool:
    """Whether oneDNN packs (reorders) bf16 linear weights here: it needs AVX-512 (BW, VL,
    DQ) or AVX-NE-CONVERT, and refuses with a RuntimeError otherwise."""
    info = cpu_info()
    if not (info.has("avx512bw", "avx512vl", "avx512dq") or info.has("avx_ne_convert")):
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else True


_said: set[str] = set()


def notice(message: str) -> None:
    """Print ``folklm: notice: message`` once per process on stderr (a slower path taken)."""
    if message not in _said:
        _said.add(message)
        print(f"folklm: notice: {message}", file=sys.stderr)
