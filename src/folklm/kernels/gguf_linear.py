"""Linear layers and embeddings that compute directly on GGML-quantized blocks.

A GGUF file's quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) stay as their
raw blocks, memory-mapped from the file: nothing is copied, and no whole float weight is ever
made. :class:`GGUFLinear` multiplies by them with the C kernels of :mod:`folklm.kernels.native`
(``csrc/gguf_kernels.c``: the activations are quantized to int8 once per call and each block
is an integer dot product); :class:`GGUFEmbedding` dequantizes only the rows it looks up, and
a tied LM head reads the same blocks as the embedding.

Paths, chosen per call:

* ``native`` -- the compiled library's vector path (AVX2, or AVX2 with VNNI ``vpdpbusd``)
  where the build has one, else its portable scalar C;
* ``scalar`` -- the library's portable C path (a self-check, and what non-x86 CPUs run);
* ``torch`` -- no compiler: each call dequantizes the weight tile by tile with the ``gguf``
  package's decoder and multiplies in PyTorch (exact float weights, small memory, slow).

For many activation rows (prefill) the native path dequantizes the weight in tiles of rows
into a float scratch buffer and lets PyTorch's GEMM do the product, which is faster than the
integer path once the tile is reused by enough rows (``PREFILL_ROWS``).

Modules are swapped in after the model is built (:func:`install_gguf_modules`), like
``folklm.quant`` does; they are not ``nn.Linear`` so ``engine.fast.pack_linears`` leaves them.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from torch import nn

from folklm.kernels import native

# (weights per block, bytes per block) of the encodings computed on directly, as the gguf
# package (llama.cpp's own tables) gives them.
BLOCKS: dict[Q, tuple[int, int]] = {
    q: GGML_QUANT_SIZES[q] for q in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
}
PREFILL_ROWS = 8  # activation rows from which the dequantize-tile + float GEMM path is used
TILE_WEIGHTS = 1 << 20  # weights dequantized per tile (4 MB of float32 scratch)
# int8 levels of the activations in the integer kernel (FOLK_GGUF_LEVELS=1 for llama.cpp's
# single rounding: faster, about 0.5% relative error per product).
ACTIVATION_LEVELS = int(
    os.environ.get("FOLK_GGUF_LEVELS", "2")
)  # weights dequantized per tile (4 MB of float32 scratch)


@dataclass
class GGUFTensor:
    """One quantized 2-D GGML tensor, kept as its blocks.

    Attributes:
        qtype: the GGML encoding.
        shape: ``(rows, in_features)`` in Hugging Face order.
        blocks: ``uint8`` of shape ``(rows, row_bytes)``: the file's bytes (usually a view of
            the memory map), row ``r`` being stored row ``r``.
        order: ``int64`` of shape ``(rows,)`` or None: ``order[i]`` is the stored row that is
            Hugging Face row ``i`` (llama.cpp permutes the rows of q/k for RoPE).
    """

    qtype: Q
    shape: tuple[int, int]
    blocks: torch.Tensor
    order: torch.Tensor | None = None

    @classmethod
    def from_bytes(
        cls, data: np.ndarray, qtype: Q, shape: tuple[int, int], order: torch.Tensor | None = None
    ) -> GGUFTensor:
        """Wrap the raw bytes ``data`` (e.g. ``GGUFReader``'s memory map) without copying."""
        qtype = Q(qtype)
        rows, k = shape
        block, size = BLOCKS[qtype]
        if k % block:
            raise ValueError(f"{qtype.name} rows need a multiple of {block} weights, got {k}")
        flat = data.reshape(-1).view(np.uint8)
        if flat.size != rows * (k // block) * size:
            raise ValueError(
                f"{qtype.name} tensor of shape {shape} needs {rows * (k // block) * size} bytes, "
                f"got {flat.size}"
            )
        with warnings.catch_warnings():  # a read-only memory map: we never write to it
            warnings.simplefilter("ignore", UserWarning)
            blocks = torch.from_numpy(flat).view(rows, (k // block) * size)
        return cls(qtype, (rows, k), blocks, order)

    @property
    def out_index(self) -> torch.Tensor | None:
        """``out_index[r]``: the Hugging Face row of stored row ``r`` (None: the same)."""
        if self.order is None:
            return None
        if not hasattr(self, "_out_index"):
            self._out_index = torch.argsort(self.order)
        return self._out_index

    def rows(self, start: int, stop: int) -> GGUFTensor:
        """Stored rows ``start:stop`` (no copy; only for tensors without a row order)."""
        if self.order is not None:
            raise ValueError("cannot slice a row-permuted GGUF tensor")
        return GGUFTensor(self.qtype, (stop - start, self.shape[1]), self.blocks[start:stop])

    def dequantize(self, rows: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
        """Float32 Hugging Face rows ``rows`` (default all), bit-identical to ggml's decoder."""
        if rows is None:
            rows = torch.arange(self.shape[0])
        rows = rows.reshape(-1).to(torch.int64)
        stored = rows if self.order is None else self.order[rows]
        lib = _library(backend)
        if lib is None:  # llama.cpp's own numpy decoder (the gguf package): exact, slow
            picked = self.blocks[stored].numpy()
            return torch.from_numpy(gguf_dequantize(picked, self.qtype).reshape(len(stored), -1))
        stored = stored.contiguous()
        out = torch.empty(len(stored), self.shape[1], dtype=torch.float32)
        rc = lib.lib.folk_dequant_rows(
            int(self.qtype),
            self.blocks.data_ptr(),
            self.blocks.stride(0),
            self.shape[1],
            stored.data_ptr(),
            0,
            len(stored),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if rc:
            raise RuntimeError(f"folk_dequant_rows failed for {self.qtype.name}")
        return out

    def dequantize_range(self, start: int, stop: int, lib: native.NativeKernels) -> torch.Tensor:
        """Float32 Hugging Face rows ``start:stop`` (a prefill tile)."""
        out = torch.empty(stop - start, self.shape[1], dtype=torch.float32)
        if self.order is None:
            rows_ptr, first = None, start
        else:
            idx = self.order[start:stop].contiguous()
            rows_ptr, first = idx.data_ptr(), 0
        rc = lib.lib.folk_dequant_rows(
            int(self.qtype),
            self.blocks.data_ptr(),
            self.blocks.stride(0),
            self.shape[1],
            rows_ptr,
            first,
            stop - start,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if rc:
            raise RuntimeError(f"folk_dequant_rows failed for {self.qtype.name}")
        return out


def _library(backend: str) -> native.NativeKernels | None:
    if backend == "torch":
        return None
    return native.kernels()


def gguf_matmul(
    t: GGUFTensor,
    x: torch.Tensor,
    backend: str = "auto",
    lib: native.NativeKernels | None = None,
    levels: int | None = None,
) -> torch.Tensor:
    """``x @ W.T`` for float32 ``x`` of shape ``(m, in_features)`` -> ``(m, rows)`` float32.

    Args:
        t: the quantized weight.
        x: activations, float32, contiguous.
        backend: ``auto`` (native; float GEMM over dequantized tiles from ``PREFILL_ROWS``
            rows), ``native`` (always the integer kernel), ``scalar`` (the kernel's portable C
            path), ``torch`` (dequantize tiles in PyTorch).
        lib: the kernel library (default: :func:`native.kernels`).
        levels: int8 levels the activations are rounded to: 1 (llama.cpp's choice), or 2 (the
            rounding residual is rounded again: results within about 1e-4 of float, so
            greedy decoding follows the dequantized model); default ``ACTIVATION_LEVELS``.
    """
    levels = levels or ACTIVATION_LEVELS
    m, k = x.shape
    n = t.shape[0]
    lib = lib or (None if backend == "torch" else native.kernels())
    if lib is None or backend == "torch":
        return _tiled(t, x, None)
    if backend == "auto" and m >= PREFILL_ROWS:
        return _tiled(t, x, lib)
    y = torch.empty(m, n, dtype=torch.float32)
    out_index = t.out_index
    rc = lib.lib.folk_matmul(
        int(t.qtype),
        t.blocks.data_ptr(),
        t.blocks.stride(0),
        n,
        k,
        x.data_ptr(),
        m,
        y.data_ptr(),
        n,
        None if out_index is None else out_index.data_ptr(),
        levels,
        torch.get_num_threads(),
        1 if backend == "scalar" else 0,
    )
    if rc:
        raise RuntimeError(f"folk_matmul failed for {t.qtype.name} of shape {t.shape}")
    return y


def _tiled(t: GGUFTensor, x: torch.Tensor, lib: native.NativeKernels | None) -> torch.Tensor:
    n, k = t.shape
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    step = max(1, TILE_WEIGHTS // k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        if lib is None:
            w = t.dequantize(torch.arange(start, stop), backend="torch")
        else:
            w = t.dequantize_range(start, stop, lib)
        torch.matmul(x, w.t(), out=y[:, start:stop])
    return y


class GGUFLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` kept as GGML blocks (inference only)."""

    def __init__(self, weight: GGUFTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight = weight
        self.out_features, self.in_features = weight.shape
        # The blocks are a buffer so that .to()/state_dict walks see them; not persistent:
        # a GGUF model is saved by converting, never through state_dict.
        self.register_buffer("blocks", weight.blocks, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        y = gguf_matmul(self.qweight, x2, self.backend)
        if self.bias is not None:
            y += self.bias.to(torch.float32)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The whole float32 weight (a new tensor: for checks and conversions only)."""
        return self.qweight.dequantize()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"qtype={self.qweight.qtype.name}, bias={self.bias is not None}"
        )


class GGUFEmbedding(nn.Module):
    """Embedding lookup that dequantizes only the rows asked for."""

    def __init__(self, weight: GGUFTensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("blocks", weight.blocks, persistent=False)
        self.dtype = dtype
        self.backend = "auto"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.dequantize(ids.reshape(-1), self.backend)
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qweight.qtype.name}"


def install_gguf_modules(
    model: nn.Module, quantized: dict[str, GGUFTensor], dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Replace the ``nn.Linear`` / ``nn.Embedding`` owning each ``<module>.weight`` in
    ``quantized`` by a :class:`GGUFLinear` / :class:`GGUFEmbedding`; a linear that shares its
    weight with a replaced embedding (a tied LM head) reads the embedding's blocks.
    """
    replaced: dict[int, GGUFTensor] = {}

    def swap(name: str, new: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)

    for pname, t in quantized.items():
        name = pname.removesuffix(".weight")
        old = model.get_submodule(name)
        if isinstance(old, nn.Embedding):
            new: nn.Module = GGUFEmbedding(t, dtype)
        elif isinstance(old, nn.Linear):
            new = GGUFLinear(t, None if old.bias is None else old.bias.to(dtype))
        else:
            raise TypeError(f"{name} is a {type(old).__name__}; expected nn.Linear/nn.Embedding")
        if tuple(old.weight.shape) != t.shape:
            raise ValueError(f"{pname}: GGUF shape {t.shape}, model expects {old.weight.shape}")
        replaced[id(old.weight)] = t
        swap(name, new)
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and id(m.weight) in replaced:
            swap(name, GGUFLinear(replaced[id(m.weight)], m.bias))
    return model
