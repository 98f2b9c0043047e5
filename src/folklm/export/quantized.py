"""Quantized models as GGUF tensors: what ``folk export NAME --format gguf`` writes.

An ``int8`` entry becomes Q8_0 without a second rounding (its codes, with the row scale as
every block's scale, rounded to f16); other schemes are dequantized to float32 and encoded
by llama.cpp's reference Q8_0/Q4_0 quantizers (:mod:`folklm.checkpoint.gguf_encode`).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import nn

from folklm.checkpoint.gguf_encode import Encoded, int8_as_q8_0
from folklm.kernels.base import QuantizedLinear
from folklm.kernels.int8 import Int8Linear


def default_gguf_type(scheme: str) -> str:
    """The GGUF block type closest to a folklm scheme: ``q8_0`` for int8, else ``q4_0``."""
    return "q8_0" if scheme == "int8" else "q4_0"


def gguf_tensors(model: nn.Module, target: str) -> dict[str, torch.Tensor | Encoded]:
    """Hugging Face name -> float tensor (or pre-encoded blocks) for ``write_gguf``."""
    out: dict[str, torch.Tensor | Encoded] = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, m in quantized.items():
        exact = (
            target == "q8_0"
            and isinstance(m, Int8Linear)
            and m.in_features % 32 == 0
            and ".experts." not in name  # experts are stacked as floats by the writer
        )
        if exact:
            qweight, scales = m.qweight, m.scales
            # buffers; nn.Module.__getattr__ is typed Tensor | Module
            assert isinstance(qweight, torch.Tensor) and isinstance(scales, torch.Tensor)
            data = int8_as_q8_0(qweight, scales)
            out[f"{name}.weight"] = Encoded(data, GGMLQuantizationType.Q8_0)
        else:
            out[f"{name}.weight"] = m.dequantize(torch.float32)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().float()
    for key, t in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in quantized:
            out[key] = t.detach().float()
    return out
