"""Inference-time speed-ups that swap modules after the model is built.

Decoding one token at a time is a chain of matrix-vector products whose cost is reading
the weights. PyTorch's default CPU path for ``x @ W.T`` with a short inner dimension
(hidden size 576 for SmolLM2) reads them well below the memory bandwidth; oneDNN's
pre-packed ("reordered") weight layout, the one ``torch.compile``'s CPU backend uses, reads
them about 1.5x faster (``bench/generate.py`` shows the end-to-end effect).

Model code is untouched: ``pack_linears`` replaces each ``nn.Linear`` by a ``PackedLinear``
whose state dict still holds ``weight`` (unpacked on demand), so saving and parity checks
see the same tensors. The dense copy is not kept: for a memory-mapped checkpoint its file
pages are released, so packing does not double the resident memory. Inference only.
"""

from __future__ import annotations

import torch
from torch import nn

from folklm.checkpoint.safetensors_io import release_pages


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """A frozen linear layer whose weight is stored in oneDNN's packed layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight, rebuilt from the packed one."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"PackedLinear holds {self.dtype} weights, got {x.dtype} input")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(model: nn.Module) -> nn.Module:
    """Swap every float32/bfloat16 ``nn.Linear`` for a ``PackedLinear``, in place."""
    if not packing_available():
        return model
    # Weights that other modules still use (a tied embedding): their pages must stay.
    shared = {
        m.weight.data_ptr()
        for m in model.modules()
        if not isinstance(m, nn.Linear) and isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16):
                packed = PackedLinear(child)
                if child.weight.data_ptr() not in shared:
                    release_pages(child.weight)
                setattr(parent, name, packed)
    return model
