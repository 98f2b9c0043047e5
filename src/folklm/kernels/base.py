"""What every quantized linear layer shares: the ``nn.Linear`` surface and kernel dispatch.

A quantized layer stands in for an ``nn.Linear`` (same ``in_features``, ``out_features``,
``bias``; same call), so model code does not change when layers are swapped (mlx-lm's
``to_quantized()`` protocol). Its weight is frozen: integer codes and scales are buffers,
the bias a parameter with ``requires_grad=False``. ``dequantize()`` returns the dense weight
the layer computes with; a LoRA/QLoRA wrapper builds on it.

PyTorch's weight-only kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are
written for decoding: a few rows of activations against a large weight. For many rows a
dense matmul on the dequantized weight is faster (measured figures: the README's
Performance section). So ``forward`` sends inputs of up to ``kernel_max_rows`` rows to the
kernel and larger ones to a dense matmul on the dequantized weight; both compute the same
numbers up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from folklm.kernels.choice import kernel_dtype

# Activation dtypes PyTorch's CPU weight-only kernels accept.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Dtypes scales may be stored in (those of the layer being quantized); others become float32.
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in SCALE_DTYPES else torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dequantize in float64 when float64 is asked for (references), else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class QuantizedLinear(nn.Module):
    """Base of Int8Linear, Int4Linear and NF4Linear.

    Subclasses set ``in_features``, ``out_features`` and ``bias`` and implement
    ``dequantize`` and ``_kernel`` (or leave ``has_kernel`` False).
    """

    in_features: int
    out_features: int
    scheme: str = ""
    # Most activation rows (tokens x batch) sent to the kernel, by dtype (the table above;
    # float16 is assumed to behave as bfloat16).
    kernel_max_rows: dict[torch.dtype, int] = {}

    def _init_bias(self, bias: torch.Tensor | bool | None, dtype: torch.dtype, device=None) -> None:
        if isinstance(bias, torch.Tensor):
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        elif bias:
            b = torch.zeros(self.out_features, dtype=dtype, device=device)
            self.bias = nn.Parameter(b, requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def has_kernel(self) -> bool:
        return False

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out_features, in_features) weight this layer computes with."""
        raise NotImplementedError

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize(torch.float32).to(x.dtype)
        return torch.nn.functional.linear(x, w)

    def forward(self, x: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
        """``x @ W.T + b`` for ``x`` of shape (..., in_features).

        Args:
            use_kernel: None picks the fastest path; True forces PyTorch's packed kernel
                (an error where it does not apply); False forces dequantize + matmul.
        """
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (rows, in_features)
        kd = kernel_dtype(x.dtype)  # float32 runs the kernel in bf16 on x86 (kernels.choice)
        if use_kernel is None:
            rows = self.kernel_max_rows.get(kd, 0)
            use_kernel = self.has_kernel and x2.shape[0] <= rows
        elif use_kernel and not (self.has_kernel and x.dtype in KERNEL_DTYPES):
            raise ValueError(f"{type(self).__name__}: no packed kernel for this layer/{x.dtype}")
        y = self._kernel(x2.to(kd).contiguous()).to(x.dtype) if use_kernel else self._dense(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme}"
        )
