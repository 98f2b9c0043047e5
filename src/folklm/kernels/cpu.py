"""What the CPU can do, read once at run time: the basis for every kernel choice.

Kernels are chosen from these features, never from an assumed machine: the same install
runs on an AVX2-only laptop and on an AVX-512/AMX server. Flags come from
``/proc/cpuinfo`` on Linux (the kernel's names: ``avx2``, ``avx512bw``, ``avx512_bf16``,
``amx_bf16`` ...); elsewhere the set is empty and callers take their portable paths.
``FOLK_CPU_FLAGS_MASK`` (comma-separated flags) hides features, so the AVX2 paths can be
exercised on a bigger machine.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and feature flags (lower case, as Linux names them)."""

    model: str
    flags: frozenset[str]
    machine: str

    def has(self, *names: str) -> bool:
        return all(n in self.flags for n in names)

    @property
    def avx2(self) -> bool:
        return self.has("avx2", "fma")

    @property
    def avx512(self) -> bool:
        return self.has("avx512f", "avx512bw", "avx512vl")

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run natively (AVX-512-BF16, AMX or AVX-NE-CONVERT), not emulated."""
        return self.has("avx512_bf16") or self.has("amx_bf16") or self.has("avx_ne_convert")

    @property
    def fingerprint(self) -> str:
        """Short stable id of (machine, model, flags): a key for compiled artefacts."""
        text = "|".join([self.machine, self.model, ",".join(sorted(self.flags))])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def summary(self, interesting: tuple[str, ...] = ()) -> str:
        """``model [flag flag ...]`` with the flags that matter to our kernels."""
        names = interesting or (
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512_vnni",
            "avx_vnni",
            "avx512_bf16",
            "amx_bf16",
            "amx_int8",
            "avx_ne_convert",
            "neon",
            "asimd",
            "sve",
        )
        present = [n for n in names if n in self.flags]
        return f"{self.model} [{' '.join(present) or 'no SIMD flags read'}]"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """Read the CPU once per process (``FOLK_CPU_FLAGS_MASK`` removes flags)."""
    model = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and model in ("", "unknown CPU"):
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    hidden = {f.strip().lower() for f in os.environ.get("FOLK_CPU_FLAGS_MASK", "").split(",")}
    return CpuInfo(model=model, flags=frozenset(flags - hidden), machine=platform.machine())
