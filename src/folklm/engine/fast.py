"""Inference-time speed-ups that swap modules after the model is built.

Decoding one token at a time on a CPU costs two things: reading every weight once (memory
bandwidth) and dispatching a few hundred small operations (fixed cost per call). Two
changes address them without touching the maths:

- **Packed weights.** PyTorch's default CPU path for ``x @ W.T`` with a short inner
  dimension (576 for SmolLM2) reads the weights well below the memory bandwidth; oneDNN's
  pre-packed ("reordered") layout, the one ``torch.compile``'s CPU backend uses, reads
  them faster (figures: the README's Performance section).
- **Fused projections.** q/k/v become one matrix and gate/up another, so each layer makes
  three fewer calls, each with its fixed cost.

Model code only offers the optional ``qkv_proj`` / ``gate_up_proj`` slots; this module
fills them. State dicts keep the Hugging Face names (``q_proj.weight`` ...), unpacked on
demand, so saving and parity checks see the same tensors. The dense copies are dropped:
for a memory-mapped checkpoint their file pages are released, so packing does not double
the resident memory. Inference only (no autograd through packed weights).

oneDNN packs bfloat16 weights only on CPUs with AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT
(``engine.device.bf16_packing_supported``); elsewhere bf16 linears stay plain
``nn.Linear`` modules (emulated bf16, slower than float32 there) and a one-line notice says
so. float32 weights are packed on every x86-64 CPU.

NF4 layers (QLoRA's frozen base, no CPU kernel) become int8 layers for inference
(``NF4Linear.to_int8``, whose docstring states the measured quality cost).
"""

from __future__ import annotations

import torch
from torch import nn

from folklm.checkpoint.safetensors_io import release_pages
from folklm.engine.device import bf16_packing_supported, notice


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """A frozen linear layer (or several stacked along the output) in oneDNN's layout.

    Args:
        linears: (name, module) pairs; their weights are stacked along the output
            dimension, in this order. One pair is a plain packed linear.
        slot: the attribute name this module is stored under in its parent, so that the
            state dict can write the parts back under their own names.
    """

    def __init__(self, linears: list[tuple[str, nn.Linear]], slot: str):
        super().__init__()
        weights = [lin.weight.detach() for _, lin in linears]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
        self.dtype = weight.dtype
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.slot = slot
        self.parts = [(name, w.shape[0]) for (name, _), w in zip(linears, weights, strict=True)]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        biases = [lin.bias for _, lin in linears]
        if all(b is None for b in biases):
            self.bias = None
        else:
            self.bias = torch.cat(
                [
                    b.detach() if b is not None else weight.new_zeros(n)
                    for b, (_, n) in zip(biases, self.parts, strict=True)
                ]
            )

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out_features, in_features) weight, rebuilt from the packed one."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"PackedLinear holds {self.dtype} weights, got {x.dtype} input")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        parent = prefix[: len(prefix) - len(self.slot) - 1]
        sizes = [n for _, n in self.parts]
        for (name, _), w in zip(self.parts, self.weight.split(sizes), strict=True):
            destination[f"{parent}{name}.weight"] = w
        if self.bias is not None:
            for (name, _), b in zip(self.parts, self.bias.split(sizes), strict=True):
                destination[f"{parent}{name}.bias"] = b

    def extra_repr(self) -> str:
        names = "+".join(n for n, _ in self.parts)
        return f"{names}: in_features={self.in_features}, out_features={self.out_features}"


def _fusable(module: nn.Module, names: tuple[str, ...]) -> bool:
    return all(type(getattr(module, n, None)) is nn.Linear for n in names)


def nf4_to_int8(model: nn.Module) -> nn.Module:
    """NF4 layers become int8 ones for inference (no NF4 kernel; the cost is stated in
    ``NF4Linear.to_int8``)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            to_int8 = getattr(child, "to_int8", None)
            if getattr(child, "scheme", "") == "nf4" and to_int8 is not None:
                setattr(module, name, to_int8())
    return model


def pack_linears(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Fuse q/k/v and gate/up where the model offers a slot, and pack every linear; NF4
    layers become int8 ones (no NF4 kernel)."""
    nf4_to_int8(model)
    if not packing_available():
        return model
    # Weights that other modules still use (a tied embedding): their pages must stay.
    shared = {
        weight.data_ptr()
        for m in model.modules()
        if not isinstance(m, nn.Linear)
        and isinstance(weight := getattr(m, "weight", None), torch.Tensor)
    }

    def swap(parent: nn.Module, names: tuple[str, ...], slot: str) -> None:
        linears = [(n, getattr(parent, n)) for n in names]
        dtypes = {lin.weight.dtype for _, lin in linears}
        if not dtypes <= {torch.float32, torch.bfloat16}:
            return
        if torch.bfloat16 in dtypes and not bf16_packing_supported():
            notice(
                "this CPU has no native bfloat16 (AVX-512-BF16/AMX/AVX-NE-CONVERT): bf16 "
                "linears run unpacked and emulated; --dtype float32 is faster here"
            )
            return
        packed = PackedLinear(linears, slot)
        for n, lin in linears:
            if lin.weight.data_ptr() not in shared:
                release_pages(lin.weight)
            if slot != n:
                delattr(parent, n)
        setattr(parent, slot, packed)

    for module in list(model.modules()):
        if (
            fuse
            and hasattr(module, "qkv_proj")
            and _fusable(module, ("q_proj", "k_proj", "v_proj"))
        ):
            swap(module, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
        if fuse and hasattr(module, "gate_up_proj") and _fusable(module, ("gate_proj", "up_proj")):
            swap(module, ("gate_proj", "up_proj"), "gate_up_proj")
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                swap(module, (name,), name)
    return model
