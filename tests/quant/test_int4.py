"""Int4Linear: exact grid, group-size ordering, packed kernel == fallback, storage."""

from __future__ import annotations

import pytest
import torch
from quanttest import gaussian_linear, rel_err, uniform_noise_estimate

from folklm.errors import FolkError
from folklm.kernels.choice import kernel_dtype
from folklm.kernels.int4 import kernel_works, pack_nibbles, unpack_nibbles
from folklm.quant import Int4Linear


def _grid(layer: Int4Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes, scale and zero of every weight, (N, K) float64."""
    G = layer.group_size
    s = layer.scales.double().repeat_interleave(G, dim=1)
    z = layer.zeros.double().repeat_interleave(G, dim=1)
    return layer.codes().double(), s, z


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_grid_is_exact_and_error_at_most_half_a_step(seed, group_size):
    lin = gaussian_linear(64, 256)
    layer = Int4Linear.from_linear(lin, group_size)
    q, s, z = _grid(layer)
    assert 0 <= q.min() and q.max() <= 15
    assert torch.equal(layer.dequantize(torch.float64), s * (q - 8) + z), f"seed={seed}"
    err = (lin.weight.double() - (s * (q - 8) + z)).abs()
    assert bool((err <= s / 2 * (1 + 1e-5)).all()), f"seed={seed}: {(err / s).max()}"
    # min and max of every group are on the grid's ends (codes 0 and 15)
    qg = q.reshape(64, -1, group_size)
    assert bool((qg.amin(-1) == 0).all() and (qg.amax(-1) == 15).all()), f"seed={seed}"


def test_bfloat16_storage_bound(seed):
    """Scale and zero rounded to bfloat16 move the grid by at most 2^-9 (|z| + 8 s)."""
    lin = gaussian_linear(64, 256).to(torch.bfloat16)
    layer = Int4Linear.from_linear(lin, 64)
    assert layer.scales.dtype == torch.bfloat16
    q, s, z = _grid(layer)
    err = (lin.weight.double() - (s * (q - 8) + z)).abs()
    bound = s / 2 + 2**-9 * (z.abs() + 8 * s)
    assert bool((err <= bound).all()), f"seed={seed}"


def test_smaller_groups_are_more_accurate_as_derived(seed):
    lin = gaussian_linear(256, 1024)
    x = torch.randn(64, 1024)
    ref = x.double() @ lin.weight.double().T
    rels = []
    for G in (32, 64, 128):
        layer = Int4Linear.from_linear(lin, G)
        rel = rel_err(layer(x), ref)
        est = uniform_noise_estimate(layer.scales.repeat_interleave(G, 1), lin.weight)
        # Gaussian groups: range of G normals / 15 per step -> about 8 %, 9 %, 10 % RMS
        assert 0.8 * est < rel < 1.2 * est, f"seed={seed} G={G}: rel={rel:.4f} est={est:.4f}"
        rels.append(rel)
    assert rels[0] < rels[1] < rels[2] < 0.12, f"seed={seed}: {rels}"


def test_nibble_packing_round_trip(seed):
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (7, 32)
    assert torch.equal(packed[:, 0] & 15, codes[:, 0]) and torch.equal(
        packed[:, 0] >> 4, codes[:, 1]
    )
    assert torch.equal(unpack_nibbles(packed), codes), f"seed={seed}"


@pytest.mark.skipif(not kernel_works(), reason="no working int4 CPU kernel here")
@pytest.mark.parametrize("shape", [(128, 256), (96, 64), (48, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_fallback(seed, shape, dtype):
    N, K = shape
    lin = gaussian_linear(N, K, bias=True).to(dtype)
    layer = Int4Linear.from_linear(lin, 32)
    assert layer.has_kernel
    # Where PyTorch's packed layout is a known one (64-row blocks in its AVX-512 kernel, 32 in
    # its AVX2 one) the codes are read back from the packed copy, not stored twice.
    block = {"AVX512": 64, "AVX2": 32}.get(torch.backends.cpu.get_cpu_capability())
    assert (layer.qweight is None) == (block is not None and N % block == 0)
    assert layer.layout_block == (block if layer.qweight is None else None)
    codes, _, _ = quant_reference(lin.weight, 32, dtype)
    assert torch.equal(layer.codes(), codes), f"seed={seed}"
    for rows in (1, 4):
        x = torch.randn(rows, K).to(dtype)
        k, d = layer(x, use_kernel=True), layer(x, use_kernel=False)
        ref = x.double() @ layer.dequantize(torch.float64).T + layer.bias.double()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        tol_k = 1e-5 if kernel_dtype(dtype) == torch.float32 else 1e-2  # fp32 x run in bf16
        assert rel_err(k, ref) < tol_k and rel_err(d, ref) < tol, f"seed={seed} rows={rows}"
        torch.testing.assert_close(k, d, rtol=tol_k, atol=tol_k * ref.abs().max().item())


def quant_reference(w: torch.Tensor, G: int, dtype: torch.dtype):
    """PyTorch's own test helper (``_group_quantize_tensor``), written out: codes by min/max."""
    N, K = w.shape
    wg = w.float().reshape(N, K // G, G)
    mn, mx = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    s = ((mx - mn) / 15).to(dtype).float()
    z = (mn + 8 * ((mx - mn) / 15)).to(dtype).float()
    q = (torch.round((wg - z) / s) + 8).clamp(0, 15)
    return q.to(torch.uint8).reshape(N, K), s, z


def test_no_kernel_when_rows_not_multiple_of_16(seed):
    layer = Int4Linear.from_linear(gaussian_linear(40, 64), 32)
    assert not layer.has_kernel and layer.qweight is not None
    x = torch.randn(3, 64)
    ref = x.double() @ layer.dequantize(torch.float64).T
    assert rel_err(layer(x), ref) < 1e-6, f"seed={seed}"


def test_state_dict_round_trip(seed):
    lin = gaussian_linear(128, 256, bias=True).to(torch.bfloat16)
    layer = Int4Linear.from_linear(lin, 64)
    state = layer.state_dict()
    assert state["qweight"].shape == (128, 128) and state["qweight"].dtype == torch.uint8
    assert state["scales"].shape == state["zeros"].shape == (128, 4)
    again = Int4Linear(256, 128, 64, bias=True, dtype=torch.bfloat16, device="meta")
    again.load_state_dict(state, assign=True)
    x = torch.randn(3, 256).to(torch.bfloat16)
    assert torch.equal(again(x), layer(x)), f"seed={seed}"
    assert torch.equal(again.codes(), layer.codes())


def test_group_size_must_divide_in_features():
    with pytest.raises(FolkError) as e:
        Int4Linear.from_linear(gaussian_linear(64, 576), 128, name="model.layers.0.mlp.up_proj")
    msg = str(e.value)
    assert "\n" not in msg
    assert "model.layers.0.mlp.up_proj" in msg and "128" in msg and "576" in msg
    assert "32, 64" in msg  # the group sizes that would work
    with pytest.raises(FolkError, match="not supported"):
        Int4Linear.from_linear(gaussian_linear(64, 64), 16)
