"""Quantization: shrink a model's linear layers to int8, int4, NF4 or GPTQ int4.

``quantize(model, scheme)`` swaps the layers in place; ``quantized_state_dict`` and
``load_quantized`` save and reload the result without re-quantizing. See ``api`` and
:mod:`folklm.kernels.schemes` (the saved format, which the loader uses).
"""

from folklm.kernels.base import QuantizedLinear
from folklm.kernels.int4 import Int4Linear
from folklm.kernels.int8 import Int8Linear
from folklm.kernels.nf4 import NF4Linear
from folklm.kernels.schemes import SCHEMES, load_quantized, materialize_quantized, parse_scheme
from folklm.quant.api import quantize, quantized_state_dict
from folklm.quant.gptq import GPTQConfig

__all__ = [
    "SCHEMES",
    "GPTQConfig",
    "Int4Linear",
    "Int8Linear",
    "NF4Linear",
    "QuantizedLinear",
    "load_quantized",
    "materialize_quantized",
    "parse_scheme",
    "quantize",
    "quantized_state_dict",
]
