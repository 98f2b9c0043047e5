"""int4 weight-only quantization, group-wise asymmetric (one scale and zero point per group).

Each run of ``group_size`` consecutive inputs of one output row (a group) is stored as 4-bit
codes ``q`` in [0, 15] with a scale ``s`` and a zero point ``z`` of its own, and read back as

    w = s * (q - 8) + z          (z is the value of the middle code 8)

the convention of the "tinygemm" int4 kernel PyTorch ships and of gpt-fast's
``WeightOnlyInt4Linear``. Round-to-nearest uses the group's range, as PyTorch's own test
helper ``_group_quantize_tensor`` (torch/testing/_internal/common_quantization.py) does:
``s = (max - min) / 15``, ``z = min + 8 s``. Small groups track the local range of the
weights, which is what makes 4 bits usable for LLMs (Dettmers & Zettlemoyer, 2023, "The case
for 4-bit precision", arXiv:2212.09720; GPTQ's grouping, arXiv:2210.17323). For a group of
32 inputs this is llama.cpp's Q4_1 layout (``w = d * q + m`` with ``m = z - 8 s``).

Stored (``state_dict``): ``qweight`` uint8 (N, K/2), two codes per byte, the even column in the
low nibble; ``scales`` and ``zeros`` (N, K/G) in the layer's dtype. Scale and zero are rounded
to that dtype before the codes are chosen, so the codes are nearest on the grid actually used.

Kernel: ``torch.ops.aten._convert_weight_to_int4pack_for_cpu(q: int32 (N, K), 1)`` packs the
codes into an ISA-specific blocked layout (uint8 (N, K/2)); then
``_weight_int4pack_mm_for_cpu(x (M, K), packed, G, scales_and_zeros (K/G, N, 2))`` computes
``x @ W.T`` with W as above (``scales_and_zeros`` in x's dtype). It needs N % 16 == 0 and
G in {32, 64, 128, 256}. Where the packed layout is a known one (blocks of 64 rows with
PyTorch's AVX-512 kernel, 32 rows on AVX2; read back, not assumed) the canonical codes are
recovered from it on demand and not kept twice; elsewhere both copies are kept (1 byte per
weight instead of 0.5).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from folklm.errors import FolkError
from folklm.kernels.base import KERNEL_DTYPES, QuantizedLinear, compute_dtype, scale_dtype

GROUP_SIZES = (32, 64, 128, 256)  # those the kernel accepts
QMAX = 15
MID = 8


def check_group_size(name: str, in_features: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise FolkError(
            f"{name or 'linear'}: int4 group size {group_size} is not supported; "
            f"expected one of {', '.join(map(str, GROUP_SIZES))}"
        )
    if in_features % group_size:
        fits = [str(g) for g in GROUP_SIZES if in_features % g == 0]
        hint = f"; group sizes that divide it: {', '.join(fits)}" if fits else ""
        raise FolkError(
            f"{name or 'linear'}: int4 group size {group_size} does not divide "
            f"in_features={in_features}{hint}"
        )


def int4_params(
    wmin: torch.Tensor, wmax: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (rounded to ``dtype``) for groups with this min and max."""
    scale = (wmax.float() - wmin.float()) / QMAX
    zero = wmin.float() + MID * scale  # a constant group: z = its value, s arbitrary
    scale = scale.to(dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero.to(dtype)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Nearest codes (int, [0, 15]) of ``w`` on the grid ``scale * (q - 8) + zero``."""
    q = torch.round((w.float() - zero.float()) / scale.float()) + MID
    return q.clamp_(0, QMAX)


def quantize_int4(
    w: torch.Tensor, group_size: int, dtype: torch.dtype, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: codes (N, K) uint8, scales and zeros (N, K/G) in ``dtype``."""
    N, K = w.shape
    check_group_size(name, K, group_size)
    wg = w.detach().float().reshape(N, K // group_size, group_size)  # (N, groups, G)
    scales, zeros = int4_params(wg.amin(-1), wg.amax(-1), dtype)
    q = int4_codes(wg, scales[..., None], zeros[..., None])
    return q.to(torch.uint8).reshape(N, K), scales, zeros


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) uint8, even column in the low nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes; inverse of ``pack_nibbles``."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


# Rows per block of the kernel's packed layout: 64 where PyTorch runs its AVX-512 kernel,
# 32 on AVX2 (torch 2.13). Which one applies is read back from a packed weight, not assumed.
LAYOUT_BLOCKS = (64, 32)


def _unpack_kernel_layout(packed: torch.Tensor, N: int, K: int, block: int = 64) -> torch.Tensor:
    """Codes (N, K) from the packed layout with ``block``-row blocks: (N/block, K, block/2)
    bytes, byte j holding row j in its low nibble and row j + block/2 in its high nibble."""
    b = packed.reshape(N // block, K, block // 2)
    rows = torch.cat([b & 15, b >> 4], dim=2)  # (N/block, K, block)
    return rows.permute(0, 2, 1).reshape(N, K)


@functools.cache
def kernel_works() -> bool:
    """Whether the int4 CPU kernel exists here and matches a float64 reference."""
    aten = torch.ops.aten
    if not hasattr(aten, "_weight_int4pack_mm_for_cpu"):
        return False
    g = torch.Generator().manual_seed(0)
    N, K, G = 64, 64, 32
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
    scales = torch.rand(N, K // G, generator=g) + 0.5
    zeros = torch.randn(N, K // G, generator=g)
    w = (codes.double() - MID).view(N, -1, G) * scales.double()[..., None]
    w = (w + zeros.double()[..., None]).view(N, K)
    x = torch.randn(3, K, generator=g)
    try:
        packed = aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            sz = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(dtype)
            y = aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, G, sz).double()
            wd = (codes.double() - MID).view(N, -1, G) * sz[..., 0].T.double()[..., None]
            wd = (wd + sz[..., 1].T.double()[..., None]).view(N, K)
            ref = x.to(dtype).double() @ wd.T
            if not torch.allclose(y, ref, rtol=tol, atol=tol * ref.abs().max().item()):
                return False
    except RuntimeError:
        return False
    return True


def kernel_applies(N: int, K: int, group_size: int, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and N % 16 == 0
        and group_size in GROUP_SIZES
        and K % group_size == 0
        and kernel_works()
    )


class Int4Linear(QuantizedLinear):
    """A frozen linear layer with int4 group-wise weights (see the module docstring)."""

    kernel_max_rows = {torch.bfloat16: 256, torch.float16: 256, torch.float32: 2}
    # buffers (registered in __init__, all non-persistent)
    scales_and_zeros: torch.Tensor  # (K/G, N, 2)
    qweight: torch.Tensor | None  # canonical nibbles (N, K/2), or None
    packed: torch.Tensor | None  # kernel layout, or None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 64,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str = "",
    ):
        super().__init__()
        check_group_size(name, in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.scheme = f"int4-g{group_size}"
        dtype = scale_dtype(dtype)
        N, K = out_features, in_features
        # All state is non-persistent: ``state_dict`` writes the canonical tensors instead.
        sz = torch.zeros(K // group_size, N, 2, dtype=dtype, device=device)  # (K/G, N, 2)
        self.register_buffer("scales_and_zeros", sz, persistent=False)
        q = torch.zeros(N, K // 2, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", q, persistent=False)  # canonical nibbles, or None
        self.register_buffer("packed", None, persistent=False)  # kernel layout, or None
        self.layout_block: int | None = None  # rows per block of the packed layout
        self._init_bias(bias, dtype, device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 64,
        dtype: torch.dtype | None = None,
        name: str = "",
    ) -> Int4Linear:
        """Round-to-nearest quantization of ``linear`` (scales in ``dtype``, default the
        weight's). ``name`` is used in error messages."""
        w = linear.weight
        codes, scales, zeros = quantize_int4(w, group_size, scale_dtype(dtype or w.dtype), name)
        return cls.from_codes(codes, scales, zeros, group_size, linear.bias, name)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
        name: str = "",
    ) -> Int4Linear:
        """A layer from codes (N, K) in [0, 15], scales and zeros (N, K/G) (e.g. from GPTQ)."""
        N, K = codes.shape
        layer = cls(K, N, group_size, dtype=scales.dtype, device="meta", name=name)
        layer._set(codes, scales, zeros)
        layer._init_bias(bias, scales.dtype)
        return layer

    def _set(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        N, K, G = self.out_features, self.in_features, self.group_size
        if tuple(codes.shape) != (N, K) or tuple(scales.shape) != (N, K // G):
            raise ValueError(
                f"Int4Linear: codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not "
                f"fit a ({N}, {K}) weight with group size {G}"
            )
        codes = codes.to(torch.uint8)
        self.__dict__.pop("_sz_cast", None)
        self.scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
        self.qweight, self.packed, self.layout_block = pack_nibbles(codes), None, None
        if kernel_applies(N, K, G, codes.device):
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32).contiguous(), 1
            )
            # Keep one copy of the codes where they can be read back from the packed one.
            for block in LAYOUT_BLOCKS:
                if N % block == 0 and torch.equal(
                    _unpack_kernel_layout(self.packed, N, K, block), codes
                ):
                    self.qweight, self.layout_block = None, block
                    break

    @property
    def has_kernel(self) -> bool:
        return self.packed is not None

    @property
    def scales(self) -> torch.Tensor:
        return self.scales_and_zeros[..., 0].T  # (N, K/G)

    @property
    def zeros(self) -> torch.Tensor:
        return self.scales_and_zeros[..., 1].T  # (N, K/G)

    def codes(self) -> torch.Tensor:
        """The 4-bit codes as (N, K) uint8."""
        if self.qweight is not None:
            return unpack_nibbles(self.qweight)
        N, K = self.out_features, self.in_features
        packed, block = self.packed, self.layout_block
        if packed is None or block is None:  # _set keeps qweight unless the layout is known
            raise RuntimeError("Int4Linear: neither qweight nor a known packed layout")
        return _unpack_kernel_layout(packed, N, K, block)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K, G = self.out_features, self.in_features, self.group_size
        ct = compute_dtype(dtype)
        w = self.codes().to(ct).reshape(N, K // G, G)  # a new tensor: update it in place
        w.sub_(MID).mul_(self.scales.to(ct)[..., None]).add_(self.zeros.to(ct)[..., None])
        return w.reshape(N, K).to(dtype)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"Int4Linear: no kernel for {x.dtype} activations")
        sz = self.scales_and_zeros
        if sz.dtype != x.dtype:  # float32 layers run the kernel in bf16 (kernels.choice)
            cast = self.__dict__.get("_sz_cast")
            if cast is None or cast.dtype != x.dtype or cast.shape != sz.shape:
                cast = self.__dict__["_sz_cast"] = sz.to(x.dtype)
            sz = cast
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, sz)

    # -- state dict: the canonical, platform-independent tensors ------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        q = self.qweight if self.qweight is not None else pack_nibbles(self.codes())
        destination[prefix + "qweight"] = q
        destination[prefix + "scales"] = self.scales.contiguous()
        destination[prefix + "zeros"] = self.zeros.contiguous()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        names = [prefix + n for n in ("qweight", "scales", "zeros")]
        rest = {k: v for k, v in state_dict.items() if k not in names}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if any(n not in state_dict for n in names):
            missing_keys.extend(n for n in names if n not in state_dict)
            return
        q, s, z = (state_dict[n] for n in names)
        N, K, G = self.out_features, self.in_features, self.group_size
        if q.dtype != torch.uint8 or tuple(q.shape) != (N, K // 2):
            error_msgs.append(
                f"{names[0]}: expected uint8 {(N, K // 2)}, got {q.dtype} {tuple(q.shape)}"
            )
            return
        if tuple(s.shape) != (N, K // G) or tuple(z.shape) != (N, K // G):
            error_msgs.append(f"{names[1]}: expected {(N, K // G)}, got {tuple(s.shape)}")
            return
        self._set(unpack_nibbles(q), s, z.to(s.dtype))
