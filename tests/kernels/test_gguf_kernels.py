"""Tests for folklm.kernels.gguf_linear / native: products on GGML blocks, row gathers.

Reference: ``gguf.quants.dequantize`` (llama.cpp's own decoder) followed by a float64 matmul.

Error bound of the integer kernel. Each activation block of 32 values with largest magnitude
``a`` is rounded to int8 with step ``a/127``, so every value moves by at most ``a/254``; with
two levels the residual (at most ``a/254``) is rounded again, moving it by at most
``a/254**2``. Weights are exact, so for output ``i``

    |y_i - ref_i| <= sum_j |W_ij| * e_j   +   float rounding,

where ``e_j`` is that per-block bound for the block of input ``j``. Float rounding (the per-block
scale products and the accumulation over ``k/32`` blocks, float32) is bounded by
``(k/32 + 8) * 2**-23 * sum_j |W_ij x_j|``. The PyTorch fallback and the prefill path use exact
float weights and only have the float32 GEMM term (``k * 2**-23 * sum_j |W_ij x_j|``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from folklm.kernels import native
from folklm.kernels.cpu import cpu_info
from folklm.kernels.gguf_linear import (
    BLOCKS,
    PREFILL_ROWS,
    GGUFEmbedding,
    GGUFLinear,
    GGUFTensor,
    gguf_matmul,
)

FORMATS = list(BLOCKS)
EPS32 = 2.0**-23


def random_blocks(rng: np.random.Generator, qtype: Q, rows: int, k: int) -> np.ndarray:
    """``(rows, row_bytes)`` valid blocks: gguf-py's quantizer where it has one, else random
    bytes with small finite float16 scales (gguf-py cannot quantize K-quants)."""
    block, size = BLOCKS[qtype]
    if qtype not in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        w = rng.standard_normal((rows, k)).astype(np.float32)
        return gguf.quants.quantize(w, qtype).reshape(rows, -1)
    raw = rng.integers(0, 256, size=(rows, k // block, size), dtype=np.uint8)
    offsets = (208,) if qtype == Q.Q6_K else (0, 2)
    for off in offsets:
        d = rng.uniform(-0.05, 0.05, size=(rows, k // block)).astype(np.float16)
        raw[..., off : off + 2] = d.view(np.uint8).reshape(rows, k // block, 2)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, qtype: Q) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float64))


def int8_bound(w: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
    """The bound of the module docstring, (m, n) float64."""
    m, k = x.shape
    amax = x.double().abs().reshape(m, k // 32, 32).amax(-1)  # (m, k/32)
    e = (amax / 254.0**levels).repeat_interleave(32, dim=1)  # (m, k)
    rounding = (k / 32 + 8) * EPS32 * (x.double().abs() @ w.abs().t())
    return e @ w.abs().t() + rounding


def float_bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.shape[1] * EPS32 * (x.double().abs() @ w.abs().t()) + 1e-30


def paths() -> list[tuple[str, native.NativeKernels | None, str]]:
    """(name, library, backend) for every packed path this machine can run."""
    lib = native.kernels()
    assert lib is not None, "the C compiler is part of the test environment"
    out = [("native", lib, "native"), ("scalar", lib, "scalar"), ("torch", None, "torch")]
    if cpu_info().avx2 and lib.march != "x86-64-v3":
        out.append(("x86-64-v3", native.load_kernels("x86-64-v3"), "native"))
    return out


PATHS = paths()
# (path, activation levels); the PyTorch path has no activation rounding
CASES = [(p, lv) for p in PATHS for lv in ((1,) if p[2] == "torch" else (1, 2))]


@pytest.mark.parametrize("m", [1, 3, PREFILL_ROWS + 5], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0][0]}-L{c[1]}")
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_matmul_within_bound(qtype: Q, case, m: int, seed: int) -> None:
    (name, lib, backend), levels = case
    rng = np.random.default_rng(seed)
    block = BLOCKS[qtype][0]
    n, k = 37, 3 * max(block, 64)  # out_features not a multiple of any SIMD width
    raw = random_blocks(rng, qtype, n, k)
    w = reference(raw, qtype)
    t = GGUFTensor.from_bytes(raw, qtype, (n, k))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[0, :32] *= 50.0  # one block with a large outlier: the bound is per block
    y = gguf_matmul(t, x, backend, lib=lib, levels=levels).double()
    ref = x.double() @ w.t()
    bound = float_bound(w, x) if backend == "torch" else int8_bound(w, x, levels)
    excess = ((y - ref).abs() - bound).max().item()
    assert excess <= 0, f"{qtype.name} {name} m={m} L={levels}: over the bound by {excess}, {seed=}"
    # the bound is not vacuous: the error is within a small factor of it for one level
    if backend != "torch" and levels == 1:
        assert (y - ref).abs().max() > 1e-3 * bound.max(), f"{seed=}"


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_prefill_path_uses_exact_weights(qtype: Q, seed: int) -> None:
    """``auto`` with many rows: dequantized tiles and a float GEMM (no activation rounding)."""
    rng = np.random.default_rng(seed)
    n, k = 45, 2 * max(BLOCKS[qtype][0], 64)
    raw = random_blocks(rng, qtype, n, k)
    w = reference(raw, qtype)
    t = GGUFTensor.from_bytes(raw, qtype, (n, k))
    x = torch.randn(PREFILL_ROWS + 2, k)
    y = gguf_matmul(t, x, "auto").double()
    assert ((y - x.double() @ w.t()).abs() <= float_bound(w, x)).all(), f"{seed=}"


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_dequantize_rows_exact(qtype: Q, backend: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 29, 2 * max(BLOCKS[qtype][0], 64)
    raw = random_blocks(rng, qtype, n, k)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    t = GGUFTensor.from_bytes(raw, qtype, (n, k))
    ids = torch.tensor([3, 0, 28, 3, 17])
    assert torch.equal(t.dequantize(ids, backend), want[ids]), f"{seed=}"
    assert torch.equal(t.dequantize(None, backend), want), f"{seed=}"


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q6_K], ids=lambda t: t.name)
def test_row_order(qtype: Q, seed: int) -> None:
    """A permuted tensor (llama's q/k) computes as if its rows had been reordered."""
    rng = np.random.default_rng(seed)
    n, k = 24, 256
    raw = random_blocks(rng, qtype, n, k)
    order = torch.from_numpy(rng.permutation(n))
    w = reference(raw, qtype)[order]  # HF row i = stored row order[i]
    t = GGUFTensor.from_bytes(raw, qtype, (n, k), order=order)
    assert torch.equal(t.dequantize(), w.float())
    for m in (1, PREFILL_ROWS + 1):
        x = torch.randn(m, k)
        ref = x.double() @ w.t()
        for backend in ("native", "scalar", "auto", "torch"):
            y = gguf_matmul(t, x, backend).double()
            bound = float_bound(w, x) if backend == "torch" else int8_bound(w, x, 1)
            assert ((y - ref).abs() <= bound).all(), f"{backend} m={m} {seed=}"


def test_modules(seed: int) -> None:
    rng = np.random.default_rng(seed)
    raw = random_blocks(rng, Q.Q8_0, 40, 64)
    t = GGUFTensor.from_bytes(raw, Q.Q8_0, (40, 64))
    w = reference(raw, Q.Q8_0).float()
    bias = torch.randn(40)
    lin = GGUFLinear(t, bias)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w, bias), rtol=0, atol=1e-3)
    assert lin(x.bfloat16()).dtype == torch.bfloat16
    emb = GGUFEmbedding(t)
    ids = torch.tensor([[1, 39], [0, 1]])
    assert torch.equal(emb(ids), w[ids])
    assert torch.equal(lin.dequantized_weight(), w)


def test_no_compiler_falls_back_with_one_line(tmp_path) -> None:
    code = textwrap.dedent(
        """
        import numpy as np, torch, gguf
        from gguf import GGMLQuantizationType as Q
        from folklm.kernels.gguf_linear import GGUFTensor, gguf_matmul
        raw = gguf.quants.quantize(np.ones((4, 64), np.float32), Q.Q8_0)
        y = gguf_matmul(GGUFTensor.from_bytes(raw, Q.Q8_0, (4, 64)), torch.ones(1, 64))
        assert torch.allclose(y, torch.full((1, 4), 64.0), atol=0.1), y
        gguf_matmul(GGUFTensor.from_bytes(raw, Q.Q8_0, (4, 64)), torch.ones(1, 64))
        """
    )
    env = {**os.environ, "CC": "/nonexistent/cc", "PATH": str(tmp_path), "FOLK_HOME": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "PyTorch path" in lines[0], out.stderr


def test_build_is_cached_and_keyed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FOLK_HOME", str(tmp_path))
    first = native.build("x86-64")
    assert first.is_file() and first.parent.parent == tmp_path / "kernels"
    assert native.build("x86-64") == first  # cached
    assert native.build("x86-64-v2") != first  # flags are part of the key
    assert not list(first.parent.glob("*.so.tmp*")) and len(list(first.parent.iterdir())) == 1


def test_portable_build_has_no_vector_path(tmp_path, monkeypatch) -> None:
    """A baseline x86-64 build (no AVX2) runs the scalar code for every format."""
    if not cpu_info().machine.startswith(("x86_64", "AMD64")):
        pytest.skip("x86-64 only")
    monkeypatch.setenv("FOLK_HOME", str(tmp_path))
    lib = native.load_kernels("x86-64")
    assert lib.isa == "scalar"
    rng = np.random.default_rng(0)
    raw = random_blocks(rng, Q.Q5_K, 9, 256)
    w = reference(raw, Q.Q5_K)
    x = torch.randn(1, 256)
    y = gguf_matmul(GGUFTensor.from_bytes(raw, Q.Q5_K, (9, 256)), x, "native", lib=lib, levels=1)
    assert ((y.double() - x.double() @ w.t()).abs() <= int8_bound(w, x, 1)).all()


def test_bound_constant_is_tight() -> None:
    """Rounding to the nearest of 255 levels on [-a, a] moves a value by at most a/254."""
    a = 3.0
    x = torch.linspace(-a, a, 10001)
    q = torch.round(x * 127 / a).clamp(-127, 127) * a / 127
    assert (x - q).abs().max() <= a / 254 * (1 + 1e-6)
    assert (x - q).abs().max() >= a / 254 * 0.99
    assert math.isclose(254.0**2, 64516.0)


def test_compiling_shows_progress_at_a_terminal_only(tmp_path) -> None:
    import pty

    code = "from folklm.kernels import native; native.build('x86-64-v2')"
    env = {**os.environ, "FOLK_HOME": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    master, slave = pty.openpty()
    proc = subprocess.run([sys.executable, "-c", code], env=env, stderr=slave, timeout=300)
    os.close(slave)
    seen = os.read(master, 4096).decode()
    os.close(master)
    assert proc.returncode == 0
    assert "compiling the native kernels for this CPU (once)..." in seen and " s" in seen
    env["FOLK_HOME"] = str(tmp_path / "other")  # compiles again, into a pipe: quiet
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr == ""
    assert list((tmp_path / "other" / "kernels").glob("*/folk_kernels.so"))
