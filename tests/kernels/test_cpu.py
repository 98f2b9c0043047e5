"""CPU feature reading: flags parsed from /proc/cpuinfo, masking hides them."""

from __future__ import annotations

import pathlib

import pytest

from folklm.kernels import cpu


def test_reads_proc_cpuinfo_flags(monkeypatch):
    monkeypatch.delenv("FOLK_CPU_FLAGS_MASK", raising=False)  # the suite may run masked
    text = (
        pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    )
    cpu.cpu_info.cache_clear()
    info = cpu.cpu_info()
    line = next(
        (ln for ln in text.splitlines() if ln.lower().startswith(("flags", "features"))), None
    )
    if line is None:
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert info.flags == frozenset(line.split(":", 1)[1].split())
    assert len(info.fingerprint) == 12
    cpu.cpu_info.cache_clear()  # the next reader sees the environment's mask again


def test_mask_hides_features(monkeypatch):
    monkeypatch.delenv("FOLK_CPU_FLAGS_MASK", raising=False)
    cpu.cpu_info.cache_clear()
    full = cpu.cpu_info()
    monkeypatch.setenv("FOLK_CPU_FLAGS_MASK", "avx512f,avx512bw,avx512_bf16,amx_bf16")
    cpu.cpu_info.cache_clear()
    masked = cpu.cpu_info()
    cpu.cpu_info.cache_clear()
    assert not masked.avx512 and not masked.has("avx512_bf16")
    assert masked.flags == full.flags - {"avx512f", "avx512bw", "avx512_bf16", "amx_bf16"}
    assert masked.fingerprint != full.fingerprint or full.flags == masked.flags
