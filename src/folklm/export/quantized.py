"""Quantized models as GGUF tensors: what ``folk export NAME --format gguf`` writes.

An ``int8`` entry becomes Q8_0 and an int4 entry (``int4-gG``, ``gptq-int4-gG``) becomes
Q4_1, both without a second rounding: the codes are kept, and each 32-weight block takes its
row's (int8) or its group's (int4: ``d = s``, ``m = z - 8 s``) constants rounded to f16.
NF4 (16 non-uniform levels: no GGUF block type holds them) is dequantized to float32 and
re-rounded by llama.cpp's reference Q4_0 quantizer (:mod:`folklm.checkpoint.gguf_encode`),
as is any scheme exported to a block type other than its own.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import nn

from folklm.checkpoint.gguf_encode import Encoded, int4_as_q4_1, int8_as_q8_0
from folklm.kernels.base import QuantizedLinear
from folklm.kernels.int4 import Int4Linear
from folklm.kernels.int8 import Int8Linear


def default_gguf_type(scheme: str) -> str:
    """The GGUF block type that holds a folklm scheme: ``q8_0`` for int8, ``q4_1`` for int4
    and GPTQ (exactly, see the module docstring), ``q4_0`` for NF4 (re-rounded)."""
    if scheme == "int8":
        return "q8_0"
    if scheme.startswith(("int4", "gptq")):
        return "q4_1"
    return "q4_0"


def gguf_tensors(model: nn.Module, target: str) -> dict[str, torch.Tensor | Encoded]:
    """Hugging Face name -> float tensor (or pre-encoded blocks) for ``write_gguf``."""
    out: dict[str, torch.Tensor | Encoded] = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, m in quantized.items():
        # experts are stacked as floats by the writer; rows must be whole 32-weight blocks
        whole = ".experts." not in name and m.in_features % 32 == 0
        if whole and target == "q8_0" and isinstance(m, Int8Linear):
            qweight, scales = m.qweight, m.scales
            # buffers; nn.Module.__getattr__ is typed Tensor | Module
            assert isinstance(qweight, torch.Tensor) and isinstance(scales, torch.Tensor)
            data = int8_as_q8_0(qweight, scales)
            out[f"{name}.weight"] = Encoded(data, GGMLQuantizationType.Q8_0)
        elif whole and target == "q4_1" and isinstance(m, Int4Linear) and m.group_size % 32 == 0:
            data = int4_as_q4_1(m.codes(), m.scales, m.zeros, m.group_size)
            out[f"{name}.weight"] = Encoded(data, GGMLQuantizationType.Q4_1)
        else:
            out[f"{name}.weight"] = m.dequantize(torch.float32)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().float()
    for key, t in model.state_dict().items():
        if key.rsplit(".", 1)[0] not in quantized:
            out[key] = t.detach().float()
    return out
