"""Build, cache and call folklm's C kernels (``csrc/*.c``) for the CPU it runs on.

The C sources use no torch headers, so they compile in about a second with the system C
compiler and the package build never depends on torch. At first use they are compiled with
``-O3 -march=native -pthread`` (``FOLK_KERNEL_MARCH`` overrides the ``-march`` value, e.g.
``x86-64-v3`` to build the AVX2 variant on an AVX-512 machine) into
``$FOLK_HOME/kernels/<key>/`` where the key hashes the source, the compiler's version, the
flags and the CPU fingerprint (:func:`folklm.kernels.cpu.cpu_info`); the library is written to
a temporary name and renamed, so concurrent first uses never see half a file. It is loaded
with :mod:`ctypes` and called with tensors' data pointers (ctypes releases the GIL).

When no compiler works, :func:`kernels` returns None after one line on stderr, and callers
take their pure-PyTorch path. ``FOLK_KERNELS=torch`` asks for that path on purpose.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from folklm.kernels.cpu import cpu_info

SOURCES = ("gguf_kernels.c", "decode_step.c")
HEADERS = ("folk_kernels.h",)
_CSRC = Path(__file__).with_name("csrc")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p

ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx2+vnni"}


@dataclass(frozen=True)
class NativeKernels:
    """A loaded kernel library.

    Attributes:
        lib: the ``ctypes.CDLL``.
        path: where the shared library lives.
        march: the ``-march`` value it was built with.
        isa: the widest instruction set its vector path uses (``scalar``, ``avx2``,
            ``avx2+vnni``).
    """

    lib: ctypes.CDLL
    path: Path
    march: str
    isa: str


def folk_home() -> Path:
    return Path(os.environ.get("FOLK_HOME") or Path.home() / ".folklm").expanduser()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _flags(march: str) -> list[str]:
    # -ffp-contract=off: the row gather must round exactly as ggml's reference decoder does.
    arch = [] if march == "none" else [f"-march={march}"]
    return ["-O3", *arch, "-pthread", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off"]


def _identity(cc: str) -> str:
    """The compiler's identity for the cache key: its resolved path, size and modification
    time (an upgrade changes them), without running it -- a fork of a process that has torch
    loaded costs tens of milliseconds, on every start."""
    path = shutil.which(cc) or cc
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def build(march: str | None = None) -> Path:
    """Compile the kernels for ``march`` (default ``FOLK_KERNEL_MARCH`` or ``native``).

    Returns the cached library's path (built now or earlier).

    Raises:
        RuntimeError: no C compiler, or it failed (the message carries its stderr).
    """
    march = march or os.environ.get("FOLK_KERNEL_MARCH") or "native"
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (tried $CC, cc, gcc, clang)")
    flags = _flags(march)
    key = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        key.update((_CSRC / name).read_bytes())
    key.update("|".join([_identity(cc), *flags, cpu_info().fingerprint]).encode())
    folder = folk_home() / "kernels" / key.hexdigest()[:16]
    target = folder / "folk_kernels.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    tty = sys.stderr.isatty()
    if tty:  # progress for a person at a terminal; logs and tests stay quiet
        print(
            "folklm: compiling the native kernels for this CPU (once)...", end="", file=sys.stderr
        )
        sys.stderr.flush()
    t0 = time.perf_counter()
    try:
        cmd = [cc, *flags, *(str(_CSRC / s) for s in SOURCES), "-o", tmp, "-lm"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if tty:
            print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(lib: ctypes.CDLL) -> None:
    lib.folk_isa.argtypes, lib.folk_isa.restype = [], ctypes.c_int
    lib.folk_matmul.argtypes = [
        ctypes.c_int,  # GGML type
        _PTR,  # weight blocks
        _I64,  # bytes per weight row
        _I64,  # n rows
        _I64,  # k
        _PTR,  # x (m, k) float32
        _I64,  # m
        _PTR,  # y float32
        _I64,  # ldy
        _PTR,  # out_index int64 or NULL
        ctypes.c_int,  # activation levels (1: int8, 2: int8 + int8 residual)
        ctypes.c_int,  # threads
        ctypes.c_int,  # path: 0 best, 1 scalar
    ]
    lib.folk_matmul.restype = ctypes.c_int
    lib.folk_dequant_rows.argtypes = [
        ctypes.c_int,
        _PTR,
        _I64,
        _I64,
        _PTR,  # rows int64 or NULL
        _I64,  # first
        _I64,  # count
        _PTR,  # out float32
        ctypes.c_int,
    ]
    lib.folk_dequant_rows.restype = ctypes.c_int


@functools.cache
def load_kernels(march: str | None = None) -> NativeKernels:
    """Build (or find) and load the library for ``march``; raises RuntimeError on failure."""
    march = march or os.environ.get("FOLK_KERNEL_MARCH") or "native"
    path = build(march)
    lib = ctypes.CDLL(str(path))
    _bind(lib)
    return NativeKernels(lib=lib, path=path, march=march, isa=ISA_NAMES[lib.folk_isa()])


@functools.lru_cache(maxsize=1)
def kernels() -> NativeKernels | None:
    """The default library, or None (one line on stderr) when it cannot be built."""
    if os.environ.get("FOLK_KERNELS", "").lower() == "torch":
        return None
    try:
        return load_kernels()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"folklm: native GGUF kernels unavailable ({first}); using the slower PyTorch path",
            file=sys.stderr,
        )
        return None
