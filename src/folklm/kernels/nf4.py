"""NF4: 4-bit NormalFloat weights with block-wise absmax scaling, the base of QLoRA.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314) stores a frozen base weight as 4-bit codes
into the 16 "NormalFloat" levels: quantiles of N(0, 1) rescaled to [-1, 1], with an exact
zero, so that normally distributed weights use every level about equally often (section 3,
"4-bit NormalFloat"). The weight is flattened and cut into blocks of 64; each block is
divided by its absolute maximum (its "quantization constant") and each value mapped to the
nearest level. Double quantization (section 3, "Double Quantization") stores those fp32
constants again in 8 bits with one fp32 scale per 256 of them, after subtracting their
mean (they are all positive): 0.127 instead of 0.5 extra bits per weight. The paper uses
8-bit floats for that second step; this module uses symmetric int8, which for centred
constants of similar size has the finer grid.

The levels are bitsandbytes' table (``create_normal_map(offset=0.9677083)``: 8 positive
quantiles from ``norm.ppf(linspace(offset, 0.5, 9))``, 7 negative from
``linspace(offset, 0.5, 8)``, and 0, divided by the largest).

Stored: ``qweight`` uint8 (ceil(N*K/64)*32,), two codes per byte, the even element in the
low nibble; ``absmax`` fp32 (blocks,) or, double-quantized, ``absmax_q`` int8 (blocks,),
``absmax_scale`` fp32 (ceil(blocks/256),) and ``absmax_offset`` fp32 (1,). The forward pass
dequantizes to the activations' dtype and multiplies (no packed kernel); QLoRA adds its
trainable low-rank adapter on top of this frozen layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from folklm.kernels.base import QuantizedLinear, compute_dtype
from folklm.kernels.int4 import MID, QMAX, Int4Linear, pack_nibbles, quantize_int4, unpack_nibbles
from folklm.kernels.int8 import Int8Linear, quantize_int8

# bitsandbytes' NF4 table (float32), ascending; index = stored code.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCK_SIZE = 64
DQ_BLOCK_SIZE = 256
# Inference converts NF4 to int4 with groups of this size (``NF4Linear.to_int4``).
INFER_GROUP_SIZE = 32


def nf4_levels() -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32)


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest NF4 level for each value of ``x`` (values in [-1, 1])."""
    levels = nf4_levels()
    midpoints = (levels[1:] + levels[:-1]) / 2  # (15,) decision boundaries
    return torch.bucketize(x.float(), midpoints)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(blocks,) positive fp32 constants -> int8 codes, fp32 scales per 256, fp32 offset."""
    offset = absmax.mean().reshape(1)
    centred = absmax - offset
    n = absmax.numel()
    pad = (-n) % DQ_BLOCK_SIZE
    blocks = F.pad(centred, (0, pad)).reshape(-1, DQ_BLOCK_SIZE)  # (n/256, 256)
    amax = blocks.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(blocks / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[:n], scale, offset


def double_dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    s = scale.repeat_interleave(DQ_BLOCK_SIZE)[: q.numel()]
    return q.float() * s + offset


def _fit_int4(w, codes, scales, zeros, G: int, steps: int = 4):
    """Least-squares refinement of an int4 grid (``w = s (q - 8) + z`` per group of ``G``):
    alternately fit (s, z) to the codes by linear regression and re-round the codes, keeping
    for each group the grid with the smallest squared error (NF4's non-uniform levels sit
    off any uniform grid, so min/max is not the best one)."""
    N, K = w.shape
    wg = w.reshape(N, K // G, G)  # (N, groups, G)

    def error(q, s, z):
        return ((s.float()[..., None] * (q.float() - MID) + z.float()[..., None]) - wg).square()

    best_q, best_s, best_z = codes.reshape(N, K // G, G).float(), scales, zeros
    best_e = error(best_q, best_s, best_z).sum(-1)
    q = best_q
    for _ in range(steps):
        c = q - MID
        cm, wm = c.mean(-1, keepdim=True), wg.mean(-1, keepdim=True)
        var = (c - cm).square().sum(-1)
        cov = ((c - cm) * (wg - wm)).sum(-1)
        s = torch.where(var > 0, cov / var.clamp_min(1e-12), best_s.float())
        s = torch.where(s > 0, s, best_s.float()).to(scales.dtype)
        z = (wm[..., 0] - s.float() * cm[..., 0]).to(zeros.dtype)
        q = torch.round((wg - z.float()[..., None]) / s.float()[..., None]) + MID
        q = q.clamp_(0, QMAX)
        e = error(q, s, z).sum(-1)
        better = e < best_e
        best_q = torch.where(better[..., None], q, best_q)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_e = torch.minimum(e, best_e)
    return best_q.to(torch.uint8).reshape(N, K), best_s, best_z


class NF4Linear(QuantizedLinear):
    """A frozen linear layer with NF4 weights (see the module docstring)."""

    scheme = "nf4"
    # buffers (registered in __init__): the packed codes, and the per-block constants,
    # double-quantized (absmax_q, absmax_scale, absmax_offset) or not (absmax)
    qweight: torch.Tensor
    absmax_q: torch.Tensor
    absmax_scale: torch.Tensor
    absmax_offset: torch.Tensor
    absmax: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        double_quant: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.double_quant = double_quant
        numel = in_features * out_features
        blocks = -(-numel // BLOCK_SIZE)
        q = torch.zeros(blocks * BLOCK_SIZE // 2, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", q)
        if double_quant:
            n2 = -(-blocks // DQ_BLOCK_SIZE)
            absmax_q = torch.zeros(blocks, dtype=torch.int8, device=device)
            self.register_buffer("absmax_q", absmax_q)
            self.register_buffer("absmax_scale", torch.ones(n2, device=device))
            self.register_buffer("absmax_offset", torch.zeros(1, device=device))
        else:
            self.register_buffer("absmax", torch.ones(blocks, device=device))
        # The dtype the weight is dequantized to when the activations do not say (dequantize()).
        self.compute_dtype = dtype
        self._init_bias(bias, dtype, device)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, double_quant: bool = True, dtype: torch.dtype | None = None
    ) -> NF4Linear:
        """Quantize ``linear`` to NF4 (blocks of 64), optionally double-quantizing the
        constants (8-bit, blocks of 256) as QLoRA does."""
        w = linear.weight.detach()
        N, K = w.shape
        layer = cls(K, N, double_quant=double_quant, dtype=dtype or w.dtype, device="meta")
        flat = w.float().reshape(-1)
        pad = (-flat.numel()) % BLOCK_SIZE
        blocks = F.pad(flat, (0, pad)).reshape(-1, BLOCK_SIZE)  # (blocks, 64)
        absmax = blocks.abs().amax(dim=1)
        absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        if double_quant:
            layer.absmax_q, layer.absmax_scale, layer.absmax_offset = double_quantize(absmax)
            # choose the codes against the constants as stored (a block whose constant
            # rounded to 0 dequantizes to 0 whatever its codes)
            absmax = layer._absmax()
            absmax = torch.where(absmax != 0, absmax, torch.ones_like(absmax))
        else:
            layer.absmax = absmax
        codes = nf4_codes(blocks / absmax[:, None]).to(torch.uint8)
        layer.qweight = pack_nibbles(codes.reshape(1, -1)).reshape(-1)
        layer._init_bias(linear.bias, w.dtype)
        return layer

    def _absmax(self) -> torch.Tensor:
        if self.double_quant:
            return double_dequantize(self.absmax_q, self.absmax_scale, self.absmax_offset)
        return self.absmax

    def codes(self) -> torch.Tensor:
        """The NF4 codes of the flattened, padded weight, (blocks, 64) uint8."""
        return unpack_nibbles(self.qweight.reshape(1, -1)).reshape(-1, BLOCK_SIZE)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        ct = compute_dtype(dtype or self.compute_dtype)
        levels = nf4_levels().to(self.qweight.device, ct)
        w = levels[self.codes().long()] * self._absmax().to(ct)[:, None]  # (blocks, 64)
        w = w.reshape(-1)[: self.out_features * self.in_features]
        return w.reshape(self.out_features, self.in_features).to(dtype or self.compute_dtype)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def to_int8(self) -> QuantizedLinear:
        """An ``Int8Linear`` (per-channel scales, bf16) for inference: the default.

        NF4 has no CPU kernel (dequantizing per call is far slower than the packed
        kernels), so ``engine.fast.pack_linears`` converts NF4 layers for inference. int8
        (a per-channel grid of 255 levels over NF4's 16) keeps the NF4 model's predictions
        at half the memory of bf16; the int4 re-rounding (``to_int4``) halves that again at
        a far larger quality cost. ``bench/nf4.py`` measures both (README, "Quantization").
        """
        w = self.dequantize(torch.float32)
        layer = Int8Linear(self.in_features, self.out_features, bias=False, device="meta")
        layer.qweight, layer.scales = quantize_int8(w, torch.bfloat16)
        layer._init_bias(None if self.bias is None else self.bias.detach(), torch.bfloat16)
        return layer

    def to_int4(self, group_size: int = INFER_GROUP_SIZE, fit: bool = True) -> QuantizedLinear:
        """An ``Int4Linear`` (groups of ``group_size``, bf16 scales) for inference.

        The smaller, lossier alternative to ``to_int8``: NF4's values are re-rounded onto
        int4's uniform grid (a least-squares grid per group, ``_fit_int4``), which moves the
        model's predictions far more than int8 does (``bench/nf4.py`` measures KL and top-1
        agreement against the NF4 model; README, "Quantization"). Layers whose width
        ``group_size`` does not divide stay NF4 (returned unchanged).
        """
        if self.in_features % group_size:
            return self
        w = self.dequantize(torch.float32)
        codes, scales, zeros = quantize_int4(w, group_size, torch.bfloat16)
        if fit:
            codes, scales, zeros = _fit_int4(w, codes, scales, zeros, group_size)
        bias = None if self.bias is None else self.bias.detach()
        return Int4Linear.from_codes(codes, scales, zeros, group_size, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", double_quant={self.double_quant}"
