"""CPU-dependent choices: default dtype, bf16 packing, and a bf16 model on a CPU without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import folklm
from folklm.engine import device
from folklm.engine.fast import PackedLinear
from folklm.kernels import cpu

NO_BF16 = "avx512f,avx512bw,avx512vl,avx512dq,avx512_bf16,amx_bf16,avx_ne_convert"


@pytest.fixture
def masked(monkeypatch):
    """This process seen as an AVX2-only CPU (the flags only: PyTorch's own ISA stays)."""
    monkeypatch.setenv("FOLK_CPU_FLAGS_MASK", NO_BF16)
    cpu.cpu_info.cache_clear()
    device.bf16_packing_supported.cache_clear()
    yield
    monkeypatch.delenv("FOLK_CPU_FLAGS_MASK")
    cpu.cpu_info.cache_clear()
    device.bf16_packing_supported.cache_clear()


def test_default_dtype_follows_native_bf16(monkeypatch):
    want = "bfloat16" if cpu.cpu_info().native_bf16 else "float32"
    assert device.default_dtype() == want
    assert device.default_dtype("bfloat16") == want  # a quantized entry saved in bf16
    assert device.default_dtype("float32") == "float32"


def test_default_dtype_without_native_bf16(masked):
    assert not cpu.cpu_info().native_bf16
    assert device.default_dtype() == "float32"
    assert device.default_dtype("bfloat16") == "float32"
    assert not device.bf16_packing_supported()


def test_load_uses_the_default_dtype(tiny_models):
    _, folder = tiny_models("llama")
    assert folklm.load(folder).dtype == getattr(torch, device.default_dtype())
    assert folklm.load(folder, dtype="float32").dtype == torch.float32  # --dtype overrides


def test_bf16_without_packing_support_runs_unpacked_with_a_notice(
    masked, tiny_models, capsys, monkeypatch
):
    monkeypatch.setenv("FOLK_NATIVE_STEP", "0")  # the PyTorch decode path (engine.fast)
    _, folder = tiny_models("mistral")
    device._said.clear()
    capsys.readouterr()
    llm = folklm.load(folder, dtype="bfloat16")
    assert not any(isinstance(m, PackedLinear) for m in llm.model.modules())
    assert any(type(m) is nn.Linear for m in llm.model.modules())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("folklm: notice: ") and "float32" in err[0]
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        f32 = folklm.load(folder, dtype="float32", fast=False).model(ids)
        bf16 = llm.model(ids)
    assert llm.dtype == torch.bfloat16 and (bf16 - f32).norm() / f32.norm() < 0.05
    # float32 is still packed on such a CPU
    f32_fast = folklm.load(folder, dtype="float32")
    assert any(isinstance(m, PackedLinear) for m in f32_fast.model.modules())
